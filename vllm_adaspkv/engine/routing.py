"""Routes an artifact directory to the plugin's LLaVA, in the front end, before vLLM builds its config.

`vllm serve ART_DIR` and `LLM(model=ART_DIR)` both end in `EngineArgs.create_engine_config`; the
plugin wraps it. For a directory holding `adaspkv.json` it checks the artifact (`open_artifact`),
then points vLLM at the checkpoint to load (the base model, or the artifact if it is a full
checkpoint), overrides the architecture with the plugin's class, and writes the artifact's path
into `additional_config`, which reaches the engine core and every worker inside `VllmConfig`.
Any other model is left exactly as stock vLLM would serve it.
"""

from __future__ import annotations

import logging
import os

from vllm_adaspkv.engine.serving_plan import BASE_MODEL_ENV, PLUGIN_ARCHITECTURE, open_artifact
from vllm_adaspkv.engine.settings import served_artifact_path, with_settings
from vllm_adaspkv.errors import ConfigError
from vllm_adaspkv.format import is_artifact

logger = logging.getLogger("vllm.adaspkv")
_WRAPPED = "_adaspkv_routes_artifacts"


def route_artifact(engine_args) -> None:
    """Rewrites `engine_args` in place if its model is an artifact directory. Once routed (the CLI
    routes in from_cli_args, then create_engine_config comes by) it is left alone."""
    routed = served_artifact_path(engine_args.additional_config)
    if routed or not isinstance(engine_args.model, str) or not is_artifact(engine_args.model):
        return
    served = open_artifact(engine_args.model, os.environ.get(BASE_MODEL_ENV))  # ArtifactError names the field
    formats_wanted = any(layer.kv_bits != 16 for layer in served.plan.layers)
    if formats_wanted and engine_args.kv_cache_dtype not in (None, "auto"):
        raise ConfigError(f"--kv-cache-dtype {engine_args.kv_cache_dtype}: the artifact {served.artifact_dir} "
                         "sets a KV bit width per layer; a global KV cache dtype cannot be combined with it "
                         "(leave --kv-cache-dtype at auto)")
    overrides = engine_args.hf_overrides
    if callable(overrides):
        raise ConfigError("--hf-overrides as a function cannot be combined with an adaspkv artifact; pass a dict")
    if not engine_args.served_model_name:
        engine_args.served_model_name = engine_args.model  # clients keep asking for ART_DIR
    if engine_args.tokenizer in (None, engine_args.model):
        # an artifact holds no tokenizer: the base model's is the artifact's (`vllm bench` and
        # `LLM(tokenizer=...)` copy the model path into --tokenizer before routing)
        engine_args.tokenizer = str(served.model_dir)
    engine_args.model = str(served.model_dir)
    engine_args.hf_overrides = {**(overrides or {}), "architectures": [PLUGIN_ARCHITECTURE]}
    # the checkpoint found here, so that the engine's processes need not look for it again
    engine_args.additional_config = with_settings(engine_args.additional_config, enabled=True,
                                                  artifact=str(served.artifact_dir), model_dir=str(served.model_dir))
    logger.info("adaspkv: serving artifact %s over %s (mean KV bits %.2f)", served.artifact_dir,
                served.model_dir, served.plan.mean_kv_bits())


def install_artifact_routing() -> None:
    """Wraps `EngineArgs.create_engine_config`, once per process."""
    from vllm.engine.arg_utils import EngineArgs

    if getattr(EngineArgs.create_engine_config, _WRAPPED, False):
        return
    create_engine_config = EngineArgs.create_engine_config

    def create_engine_config_for_artifacts(self, *args, **kwargs):
        route_artifact(self)
        return create_engine_config(self, *args, **kwargs)

    setattr(create_engine_config_for_artifacts, _WRAPPED, True)
    EngineArgs.create_engine_config = create_engine_config_for_artifacts
