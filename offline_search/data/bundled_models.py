"""Model names that every `--model` option accepts besides a directory."""

from __future__ import annotations

from pathlib import Path

from vllm_adaspkv.errors import ConfigError

MODELS_DIR = Path(__file__).parent / "models"
BUNDLED_MODELS: dict[str, Path] = {
    "shapes-llava": MODELS_DIR / "shapes-llava",
}


def resolve_model(name_or_dir: str | Path) -> Path:
    """A bundled model's directory, or the given checkpoint directory (which must hold config.json)."""
    name = str(name_or_dir)
    if name in BUNDLED_MODELS:
        path = BUNDLED_MODELS[name]
        if not (path / "config.json").is_file():
            raise ConfigError(f"bundled model {name!r} is missing from {path}; reinstall the package")
        return path
    path = Path(name)
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"model {name!r} is neither a bundled model ({', '.join(BUNDLED_MODELS)}) nor a "
            "checkpoint directory with a config.json"
        )
    return path
