"""`adaspkv demo`: a Gradio image chat with a compressed LLaVA served by `vllm serve --plugin adaspkv`.

`cli` (the subcommand, registered under `adaspkv.commands`), `launch` (servers and the app's life
cycle), `app` (the Gradio page), `chat` (streamed OpenAI chat), `plots` (the artifact's profile).
No math: the profile's numbers come from `vllm_adaspkv.format` and `vllm_adaspkv.kv`.
"""
