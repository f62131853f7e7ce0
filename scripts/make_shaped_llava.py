"""Writes a LLaVA checkpoint with a given config.json and seeded random bf16 weights, tensor by tensor
(default: the verbatim config.json of llava-hf/llava-1.5-7b-hf, 7.06B parameters, 14.1 GB in three
shards). It exercises shapes, memory and time; random weights say nothing about quality.

    python scripts/make_shaped_llava.py --out /data/llava-1.5-7b-shaped
    python scripts/make_shaped_llava.py --out DIR --config other/config.json --shard-gb 2
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

from tqdm import tqdm

from offline_search.data.text_data import read_lines, wikitext_path
from offline_search.kit.shaped_llava import llava_tensor_specs, write_shaped_llava

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "llava-1.5-7b-hf" / "config.json"

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--config", type=Path, default=FIXTURE, help="config.json to copy (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-gb", type=float, default=5.0, help="shard size in GiB (default: %(default)s)")
    args = parser.parse_args()
    start = time.perf_counter()
    from transformers import AutoConfig
    import torch

    specs = llava_tensor_specs(AutoConfig.from_pretrained(str(args.config.parent)), torch.bfloat16)
    total = sum(s.nbytes for s in specs)
    print(f"{sum(s.nbytes // 2 for s in specs) / 1e9:.3f}B parameters, {total / 1e9:.2f} GB of bf16 into {args.out}")
    corpus = [*read_lines(wikitext_path("validation")), *read_lines(wikitext_path("test"))]
    with tqdm(total=total, unit="B", unit_scale=True, desc="weights") as bar:
        write_shaped_llava(args.out, args.config, corpus, args.seed, shard_bytes=int(args.shard_gb * 2**30),
                           progress=lambda spec: bar.update(spec.nbytes))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"written in {time.perf_counter() - start:.0f} s, peak RSS {peak:.2f} GiB")
