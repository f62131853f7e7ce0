"""Decode attention over the quantized paged KV cache on CPU: the C++ kernel per KV format.

One decode step of one layer (`batch` requests at `context` tokens each; smol-llava's shape by
default: 9 query heads, 3 KV heads, head_dim 64), the cache written by the plugin's own
`write`, timed over `--iters` calls after a warm-up (median of --repeats). Printed per format:
time per call, K/V values decoded per second, and the bytes read per second beside a large
memcpy's (this machine's bandwidth as torch sees it); the 16-bit row (raw fp16 values) is the
no-unpacking reference every quantized row is divided by. Torch threads: --threads (default:
torch's). Where the serving step's time goes is `benchmarks/cpu_throughput.py --profile`;
this isolates the kernel the profile names.

    .venv/bin/python benchmarks/kernel_decode_attention_cpu.py --json results/kernel-decode-attention-cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, no install
from vllm_adaspkv.kv import cpu_kernels  # noqa: E402
from vllm_adaspkv.kv.paged import KVFormat  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--context", type=int, default=160)
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--group", type=int, default=32)
    p.add_argument("--formats", default="16,8,fp8,6,4,2", help="comma separated: 16, 8, fp8, 6, 4, 2")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    for name in ("batch", "context", "heads", "kv_heads", "head_dim", "block_size", "iters", "repeats"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} {getattr(a, name)}: must be >= 1")
    if a.heads % a.kv_heads:
        p.error(f"--heads {a.heads} must be a multiple of --kv-heads {a.kv_heads}")
    return a


def kv_format(name: str, head_dim: int, group: int) -> KVFormat:
    if name == "fp8":
        return KVFormat(8, head_dim, fp8=True)
    if name not in ("16", "8", "6", "4", "2"):
        raise SystemExit(f"--formats: {name!r} is not one of 16, 8, fp8, 6, 4, 2")
    return KVFormat(int(name), head_dim, group)


def timed(call, iters: int, repeats: int) -> float:
    """Median seconds per call."""
    call()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iters):
            call()
        samples.append((time.perf_counter() - start) / iters)
    return statistics.median(samples)


def memcpy_bandwidth() -> float:
    """Bytes/s of a 256 MiB copy (read + write counted)."""
    src = torch.empty(256 << 20, dtype=torch.uint8).random_()
    dst = torch.empty_like(src)
    seconds = timed(lambda: dst.copy_(src), 3, 3)
    return 2 * src.numel() / seconds


def measure(a: argparse.Namespace, name: str) -> dict:
    fmt = kv_format(name, a.head_dim, a.group)
    blocks_per_req = -(-a.context // a.block_size)
    num_blocks = a.batch * blocks_per_req
    torch.manual_seed(0)
    cache = torch.zeros(num_blocks, a.kv_heads, a.block_size, fmt.token_head_bytes, dtype=torch.uint8)
    tokens = num_blocks * a.block_size
    key = torch.randn(tokens, a.kv_heads, a.head_dim)
    value = torch.randn(tokens, a.kv_heads, a.head_dim)
    cpu_kernels.write(cache, key, value, torch.arange(tokens), fmt)
    block_table = torch.randperm(num_blocks, dtype=torch.int32).view(a.batch, blocks_per_req)
    seq_lens = torch.full((a.batch,), a.context, dtype=torch.int32)
    query = torch.randn(a.batch, a.heads, a.head_dim, dtype=torch.bfloat16)
    starts = torch.arange(a.batch + 1, dtype=torch.int32)
    seconds = timed(lambda: cpu_kernels.attend(query, cache, block_table, seq_lens, starts, 1, a.context,
                                                a.head_dim ** -0.5, fmt), a.iters, a.repeats)
    values = 2 * a.batch * a.kv_heads * a.context * a.head_dim  # K and V
    kv_bytes = a.batch * a.kv_heads * a.context * fmt.token_head_bytes
    return {"format": name, "row_bytes": fmt.row_bytes, "us_per_call": seconds * 1e6,
            "values_per_s": values / seconds, "bytes_per_s": kv_bytes / seconds}


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    cpu_kernels.load()
    copy = memcpy_bandwidth()
    rows = [measure(a, name) for name in a.formats.split(",")]
    reference = next((r for r in rows if r["format"] == "16"), None)
    print(f"{platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}, "
          f"memcpy {copy / 1e9:.1f} GB/s; batch {a.batch} x context {a.context}, {a.heads}/{a.kv_heads} heads, "
          f"head_dim {a.head_dim}, group {a.group}")
    print("| format | us / call | G values/s | GB/s read | of memcpy | time vs 16-bit |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        vs = f"{r['us_per_call'] / reference['us_per_call']:.2f}x" if reference else "-"
        print(f"| {r['format']} | {r['us_per_call']:.0f} | {r['values_per_s'] / 1e9:.2f} | "
              f"{r['bytes_per_s'] / 1e9:.2f} | {r['bytes_per_s'] / copy:.0%} | {vs} |")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(a).items()},
                                      "threads": torch.get_num_threads(), "memcpy_bytes_per_s": copy,
                                      "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
