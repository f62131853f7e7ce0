"""The project's own LLaVA models: the test kit (`tiny_llava`: a tiny random LLaVA that vLLM and
transformers both load) and the trainer of the bundled oracle shapes-llava (`train_shapes_llava`,
with its training-only losses in `grounding`)."""
