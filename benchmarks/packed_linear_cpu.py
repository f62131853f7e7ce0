"""The packed sparse linear kernel against torch's dense bf16 matmul, on LLaMA-7B's linear shapes.

For each weight shape (out x in: q/k/v/o 4096x4096, gate/up 11008x4096, down 4096x11008), rows of x
(1, 4, 16: decode batches) and sparsity (0.5, 0.6, 0.7), side by side in one run:
    dense   torch.nn.functional.linear(x, W) with x, W in bf16 (the pruned weight, zeros included)
    packed  vllm_adaspkv.sparse.cpu_kernels.matmul(x, pack(W, mask)): the AVX-512 kernel
Weights are cycled through copies totalling >= 512 MiB so that every call reads its weight from memory,
not from the 32 MiB L3 cache, as a decode step of a 7B model does. Each row reports the median time
(torch.utils.benchmark, blocked_autorange), the speed-up, and the weight bytes read per second against
the memory bandwidth measured here (a large tensor's sum: read-only traffic, the kernels' pattern).
Reproduce (torch's thread count is printed; default: all cores; `--threads 1` is what vLLM's CPU worker
gets on a 2-core machine):

    .venv/bin/python benchmarks/packed_linear_cpu.py --out results/packed-linear-cpu
    .venv/bin/python benchmarks/packed_linear_cpu.py --threads 1 --out results/packed-linear-cpu/one-thread
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.benchmark import Timer

from vllm_adaspkv.sparse import cpu_kernels, packing

SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008))
ROWS = (1, 4, 8, 16)
SPARSITIES = (0.5, 0.6, 0.7)
MIN_BYTES = 512 * 2**20


def median_s(fn, min_run_time: float) -> float:
    # num_threads: torch's Timer runs its statement on ONE thread unless told otherwise
    return Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=min_run_time).median


def read_bandwidth(min_run_time: float) -> float:
    """Bytes per second that a sum over a 1 GiB float32 tensor reads."""
    big = torch.ones(2**28)
    return big.numel() * 4 / median_s(lambda: big.sum(), min_run_time)


def cycled(calls):
    """One callable that runs the next of `calls` each time (each on its own copy of the weight)."""
    state = {"i": 0}

    def run():
        state["i"] = (state["i"] + 1) % len(calls)
        return calls[state["i"]]()
    return run


def measure(shape, rows: int, sparsity: float, min_run_time: float) -> dict:
    out_features, in_features = shape
    generator = torch.Generator().manual_seed(0)
    dense_bytes = out_features * in_features * 2
    copies = max(2, math.ceil(MIN_BYTES / dense_bytes))
    x = torch.randn(rows, in_features, generator=generator).bfloat16()
    weights, packs = [], []
    for _ in range(copies):
        w = torch.randn(shape, generator=generator).bfloat16()
        mask = torch.rand(shape, generator=generator) >= sparsity
        packs.append(packing.pack(w, mask))
        weights.append(torch.where(mask, w, torch.zeros((), dtype=w.dtype)))
    dense_s = median_s(cycled([lambda w=w: F.linear(x, w) for w in weights]), min_run_time)
    packed_s = median_s(cycled([lambda p=p: cpu_kernels.matmul(x, p).bfloat16() for p in packs]), min_run_time)
    check = (cpu_kernels.matmul(x, packs[0]) - F.linear(x.float(), weights[0].float())).abs().max().item()
    return {"out_features": out_features, "in_features": in_features, "rows": rows, "sparsity": sparsity,
            "dense_ms": dense_s * 1e3, "packed_ms": packed_s * 1e3, "speedup": dense_s / packed_s,
            "dense_bytes": dense_bytes, "packed_bytes": packs[0].nbytes,
            "dense_gb_s": dense_bytes / dense_s / 1e9, "packed_gb_s": packs[0].nbytes / packed_s / 1e9,
            "max_abs_diff_vs_fp32": check}


def crossover(min_run_time: float) -> list[dict]:
    """Where `cpu_kernels.linear` stops calling the kernel (MAX_KERNEL_ROWS): the kernel against torch's
    GEMM over the weight expanded a tile at a time (what `linear` runs above it) and over the whole weight
    expanded at once, 4096x4096 at sparsity 0.5, rising rows of x."""
    generator = torch.Generator().manual_seed(1)
    w = torch.randn(4096, 4096, generator=generator).bfloat16()
    packed = packing.pack(w, torch.rand(4096, 4096, generator=generator) >= 0.5)
    dense = packing.unpack(packed)
    tile_rows = cpu_kernels.expand_tile_rows(packed)
    rows = []
    for tokens in (8, 16, 32, 48, 64, 96, 128, 256):
        x = torch.randn(tokens, 4096, generator=generator).bfloat16()
        rows.append({"rows": tokens,
                     "kernel_ms": median_s(lambda x=x: cpu_kernels.matmul(x, packed), min_run_time) * 1e3,
                     "expand_tiles_ms": median_s(lambda x=x: cpu_kernels.expanded_linear(x, packed, None, tile_rows),
                                                 min_run_time) * 1e3,
                     "expand_whole_ms": median_s(lambda x=x: F.linear(x, cpu_kernels.unpack_dense(packed)),
                                                 min_run_time) * 1e3,
                     "dense_ms": median_s(lambda x=x: F.linear(x, dense), min_run_time) * 1e3})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="directory for results.json and results.md")
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds per timing (torch.utils.benchmark)")
    parser.add_argument("--shapes", default=",".join(f"{o}x{i}" for o, i in SHAPES), help="OUTxIN,...")
    parser.add_argument("--rows", default=",".join(map(str, ROWS)), help="rows of x, comma list")
    parser.add_argument("--sparsities", default=",".join(map(str, SPARSITIES)), help="comma list")
    parser.add_argument("--no-crossover", action="store_true", help="leave out the prefill crossover table")
    parser.add_argument("--threads", type=int, help="torch threads for both sides (default: torch's, all cores; "
                                                      "vLLM's CPU worker on a 2-core machine gets 1)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = [tuple(int(n) for n in shape.split("x")) for shape in args.shapes.split(",")]
    rows_list = [int(r) for r in args.rows.split(",")]
    sparsities = [float(v) for v in args.sparsities.split(",")]
    threads = torch.get_num_threads()
    bandwidth = read_bandwidth(args.min_run_time)
    print(f"torch {torch.__version__}, {threads} threads, kernel path: {cpu_kernels.isa()}, "
          f"read bandwidth {bandwidth / 1e9:.1f} GB/s (1 GiB sum)")
    header = ("| out x in | rows | sparsity | dense ms | packed ms | speed-up | dense GB/s | packed GB/s | "
              "packed / bandwidth |")
    lines = [header, "|" + "---|" * 9]
    print(header)
    results = []
    for shape in shapes:
        for rows in rows_list:
            for sparsity in sparsities:
                r = measure(shape, rows, sparsity, args.min_run_time)
                results.append(r)
                line = (f"| {shape[0]}x{shape[1]} | {rows} | {sparsity:.1f} | {r['dense_ms']:.2f} | "
                        f"{r['packed_ms']:.2f} | {r['speedup']:.2f}x | {r['dense_gb_s']:.1f} | "
                        f"{r['packed_gb_s']:.1f} | {r['packed_gb_s'] * 1e9 / bandwidth:.0%} |")
                lines.append(line)
                print(line, flush=True)
    cross = [] if args.no_crossover else crossover(args.min_run_time)
    if cross:
        lines += ["", "Prefill crossover, 4096x4096 at 0.5: the kernel against torch's GEMM over the weight expanded "
                  f"{cpu_kernels.EXPAND_TILE_BYTES // 2**20} MiB at a time (what `linear` runs above "
                  f"{cpu_kernels.MAX_KERNEL_ROWS} rows) and all at once", "",
                  "| rows | kernel ms | expand tiles + GEMM ms | expand all + GEMM ms | dense GEMM ms |",
                  "|---|---|---|---|---|"]
    for r in cross:
        lines.append(f"| {r['rows']} | {r['kernel_ms']:.2f} | {r['expand_tiles_ms']:.2f} | {r['expand_whole_ms']:.2f} | "
                     f"{r['dense_ms']:.2f} |")
        print(lines[-1], flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        meta = {"torch": torch.__version__, "threads": threads, "cpu": platform.processor() or platform.machine(),
                "kernel_path": cpu_kernels.isa(), "read_bandwidth_gb_s": bandwidth / 1e9,
                "command": shlex.join(["python", *sys.argv])}
        report = {"meta": meta, "rows": results, "crossover": cross}
        (args.out / "results.json").write_text(json.dumps(report, indent=1) + "\n")
        (args.out / "results.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
