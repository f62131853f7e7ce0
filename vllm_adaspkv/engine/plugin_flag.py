"""The `--plugin` option of `vllm serve` (and of every command built on vLLM's `EngineArgs`).

vLLM 0.32 has no such option. It does load general plugins inside `AsyncEngineArgs.add_cli_args`,
*before* that calls `EngineArgs.add_cli_args`, so a plugin that wraps `EngineArgs.add_cli_args`
adds options to the parser without editing vLLM's files. Installed plugins are always loaded, so
`--plugin adaspkv` is recorded in `VllmConfig.additional_config["adaspkv"]`, never in module state.
What the plugin does is decided by the model: an artifact directory (one holding adaspkv.json) is
served by the plugin's LLaVA (`routing`), any other model as stock vLLM serves it.
"""

from __future__ import annotations

import argparse
import logging

from vllm_adaspkv.engine.routing import route_artifact
from vllm_adaspkv.engine.settings import PLUGIN_NAME, with_settings
from vllm_adaspkv.errors import AdaspkvError
from vllm_adaspkv.format import is_artifact

logger = logging.getLogger("vllm.adaspkv")

# Plugins that this option can switch on. Others installed beside us do not read it.
KNOWN_PLUGINS: tuple[str, ...] = (PLUGIN_NAME,)
_WRAPPED = "_adaspkv_wrapped"


def plugin_name(value: str) -> str:
    """argparse type of `--plugin`: one of KNOWN_PLUGINS."""
    if value not in KNOWN_PLUGINS:
        raise argparse.ArgumentTypeError(
            f"unknown plugin {value!r}; known plugins: {', '.join(KNOWN_PLUGINS)}"
        )
    return value


def add_plugin_argument(parser: argparse.ArgumentParser) -> None:
    """Adds `--plugin NAME` in an argument group of its own (`--help=adaspkv` shows it)."""
    if "--plugin" in parser._option_string_actions:  # the same parser seen twice
        return
    group = parser.add_argument_group(
        title=PLUGIN_NAME,
        description="Options added by the vllm-adaspkv plugin.",
    )
    group.add_argument(
        "--plugin",
        type=plugin_name,
        default=None,
        metavar="NAME",
        help=(
            "Turn on an installed plugin's behaviour for this model. "
            f"Known: {', '.join(KNOWN_PLUGINS)}. `--plugin adaspkv` serves a compressed "
            "artifact (per-layer weight masks and KV-cache bit widths)."
        ),
    )


def install_plugin_flag() -> None:
    """Wraps `EngineArgs.add_cli_args` and `EngineArgs.from_cli_args`, once per process."""
    from vllm.engine.arg_utils import EngineArgs

    if getattr(EngineArgs.add_cli_args, _WRAPPED, False):
        return
    add_cli_args = EngineArgs.add_cli_args
    from_cli_args = EngineArgs.from_cli_args.__func__

    def add_cli_args_with_plugin(parser, *args, **kwargs):
        parser = add_cli_args(parser, *args, **kwargs)
        add_plugin_argument(parser)
        return parser

    def from_cli_args_with_plugin(cls, args: argparse.Namespace):
        engine_args = from_cli_args(cls, args)
        name = getattr(args, "plugin", None)
        if name == PLUGIN_NAME:
            engine_args.additional_config = with_settings(engine_args.additional_config, enabled=True)
            if not is_artifact(engine_args.model):
                logger.info("adaspkv: %s is not an artifact directory (no adaspkv.json): served as stock "
                            "vLLM serves it", engine_args.model)
        try:  # on the command line a bad artifact is one line, not a traceback
            route_artifact(engine_args)
        except AdaspkvError as exc:  # a bad artifact or option; anything else keeps its traceback
            raise SystemExit(f"adaspkv: cannot serve {args.model}: {exc}") from None
        return engine_args

    setattr(add_cli_args_with_plugin, _WRAPPED, True)
    EngineArgs.add_cli_args = staticmethod(add_cli_args_with_plugin)
    EngineArgs.from_cli_args = classmethod(from_cli_args_with_plugin)
