"""vllm-adaspkv's vLLM plugin.

vLLM loads general plugins in every process it starts (API server, engine core, workers) and calls
`register()` in each; it must therefore be idempotent and cheap, and keep no state of its own:
what a run needs travels in `VllmConfig.additional_config` (see `engine.settings`).

Layout: `format` (the artifact format and model geometry, no vLLM), `kv` (the quantized KV cache as
tensor math and its C++ and Triton kernels, no vLLM), `engine` (everything that runs inside vLLM).
"""

__version__ = "0.1.0"


def register() -> None:
    """Entry point `vllm.general_plugins: adaspkv`."""
    from vllm import ModelRegistry

    from vllm_adaspkv.engine.plugin_flag import install_plugin_flag
    from vllm_adaspkv.engine.routing import install_artifact_routing
    from vllm_adaspkv.engine.serving_plan import PLUGIN_ARCHITECTURE

    install_plugin_flag()
    install_artifact_routing()
    # The string form defers importing the model (and with it torch's device setup) to the worker.
    if PLUGIN_ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(PLUGIN_ARCHITECTURE, f"vllm_adaspkv.engine.model:{PLUGIN_ARCHITECTURE}")
