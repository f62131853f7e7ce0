"""Fresh-process `LLM(...)` run over a model or an adaspkv artifact, written as JSON: greedy tokens of
each prompt, the KV-cache block count, and (on request) where the served linear weights are zero.

Usage: python llm_artifact.py CONFIG_JSON OUT_JSON
CONFIG_JSON: {"model", "dtype", "kv_cache_memory_bytes", "max_tokens",
              "prompts": [{"prompt": str, "image": path or null}],
              optional "engine": {extra LLM(...) keyword arguments}, "zeros": bool}
"""

import json
import os
import sys

os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # apply_model ships a function

from PIL import Image  # noqa: E402

# importable by the engine process, which unpickles the function by module name
from served_zeros import zero_maps  # noqa: E402
from vllm import LLM, SamplingParams  # noqa: E402

if __name__ == "__main__":  # vLLM spawns its engine: the guard is required
    config = json.loads(open(sys.argv[1]).read())
    llm = LLM(model=config["model"], dtype=config.get("dtype", "float32"), max_model_len=256,
              enforce_eager=True, kv_cache_memory_bytes=config["kv_cache_memory_bytes"], seed=0,
              **config.get("engine", {}))
    params = SamplingParams(max_tokens=config["max_tokens"], temperature=0.0, ignore_eos=True)
    requests = [{"prompt": p["prompt"]} if not p.get("image") else
                {"prompt": p["prompt"], "multi_modal_data": {"image": Image.open(p["image"]).convert("RGB")}}
                for p in config["prompts"]]
    outputs = llm.generate(requests, params, use_tqdm=False)
    cache = llm.llm_engine.vllm_config.cache_config
    result = {"tokens": [list(o.outputs[0].token_ids) for o in outputs],
              "num_blocks": cache.num_gpu_blocks, "block_size": cache.block_size}
    if config.get("zeros"):
        result["zeros"] = llm.apply_model(zero_maps)[0]
    with open(sys.argv[2], "w") as f:
        json.dump(result, f)
