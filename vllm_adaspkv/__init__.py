"""vllm-adaspkv's vLLM plugin.

vLLM loads general plugins in every process it starts (API server, engine core, workers) and calls
`register()` in each; it must therefore be idempotent and cheap, and keep no state of its own:
what a run needs travels in `VllmConfig.additional_config` (see `plugin_flag`).
"""

__version__ = "0.1.0"


def register() -> None:
    """Entry point `vllm.general_plugins: adaspkv`."""
    from vllm_adaspkv.plugin_flag import install_plugin_flag

    install_plugin_flag()
