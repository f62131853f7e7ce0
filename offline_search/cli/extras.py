"""What `pip install vllm-adaspkv` (the serving plugin) leaves to extras, and the one-line stop of a
subcommand whose extra is missing: named before any model is loaded, not as an ImportError later."""

from __future__ import annotations

from importlib.util import find_spec

# the module that would be missing -> the extra that installs it
EXTRA_OF_MODULE = {"optuna": "search", "datasets": "search", "matplotlib": "search", "gguf": "search",
                    "gradio": "demo"}


def require_extra(command: str, *modules: str) -> None:
    """Stops `adaspkv COMMAND` in one line when a library of its extra is not installed."""
    for module in modules:
        if find_spec(module) is None:
            extra = EXTRA_OF_MODULE[module]
            raise SystemExit(f"adaspkv {command}: needs {module}, which comes with the {extra!r} extra: "
                             f"pip install 'vllm-adaspkv[{extra}]'")
