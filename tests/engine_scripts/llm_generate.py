"""Fresh-process `LLM(...)` run: greedy tokens for a text and an image prompt, written as JSON.

Usage: python llm_generate.py MODEL_DIR IMAGE_PATH MAX_TOKENS OUT_JSON
(vLLM logs to stdout, hence the file.)
"""

import json
import sys

from PIL import Image
from vllm import LLM, SamplingParams

TEXT_PROMPT = "USER: What is the quick brown fox doing? ASSISTANT:"
IMAGE_PROMPT = "USER: <image>\nWhat colour is the shape? ASSISTANT:"

if __name__ == "__main__":  # vLLM spawns its engine: the guard is required
    model_dir, image_path, max_tokens, out_json = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    llm = LLM(model=model_dir, dtype="float32", max_model_len=512, enforce_eager=True,
              kv_cache_memory_bytes=32 << 20, seed=0)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    image = Image.open(image_path).convert("RGB")
    outputs = llm.generate(
        [{"prompt": TEXT_PROMPT},
         {"prompt": IMAGE_PROMPT, "multi_modal_data": {"image": image}}],
        params,
    )
    with open(out_json, "w") as f:
        json.dump([{"prompt": TEXT_PROMPT if i == 0 else IMAGE_PROMPT,
                       "prompt_token_ids": list(o.prompt_token_ids),
                       "token_ids": list(o.outputs[0].token_ids)} for i, o in enumerate(outputs)], f)
