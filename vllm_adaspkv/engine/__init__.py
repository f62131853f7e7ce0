"""The plugin inside vLLM: everything that imports vLLM lives here.

`plugin_flag`: the `--plugin` option of `vllm serve`. `routing`: an artifact directory is served by
the plugin's LLaVA over its base model. `settings`: what the front end hands the engine through
`VllmConfig.additional_config`. `serving_plan`: what serving an artifact means, checked before any
engine starts, and the start-up table. `model`: vLLM's LLaVA with masked weights and a quantized
KV format per layer. `weight_stream`: the checkpoint's weights as the model loads them (masked, or
replaced by the artifact's packed linears). `packed_linears`: linears served packed on CPU.
`attention_backend`: the vLLM attention backend over `vllm_adaspkv.kv`.
"""
