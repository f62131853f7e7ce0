"""Fresh-process check of what register() does to vLLM's argument parsing, written as JSON.

Usage: python parse_plugin_flag.py OUT_JSON MODEL_DIR [extra vllm serve args...]
"""

import json
import sys

from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs
from vllm.utils.argparse_utils import FlexibleArgumentParser

import vllm_adaspkv

if __name__ == "__main__":
    # vLLM calls register() itself (from add_cli_args); calling it again must change nothing.
    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
    wrapped_once = EngineArgs.add_cli_args
    vllm_adaspkv.register()
    vllm_adaspkv.register()
    args = parser.parse_args(["--model", sys.argv[2], *sys.argv[3:]])
    engine_args = AsyncEngineArgs.from_cli_args(args)
    with open(sys.argv[1], "w") as f:
        json.dump({
            "plugin": args.plugin,
            "additional_config": engine_args.additional_config,
            "wrapper_unchanged_by_second_register": EngineArgs.add_cli_args is wrapped_once,
            "plugin_options_in_parser": sum(
                "--plugin" in action.option_strings for action in parser._actions),
        }, f)
