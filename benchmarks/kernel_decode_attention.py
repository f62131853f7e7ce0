"""Decode attention over the quantized paged KV cache on one CUDA GPU: time and achieved bandwidth.

For each KV width (default 16/8/6/4 bits) the Triton attention kernel (vllm_adaspkv.kv.triton_kernels)
runs one decode step of `batch` requests at `context` tokens each (LLaVA-7B shape by default: 32
query heads, 32 KV heads, head_dim 128), timed with triton.testing.do_bench. Achieved bandwidth =
KV bytes the step must read (codes and scales of every context token, K and V) / time, printed
beside the GPU's copy bandwidth (a torch copy of a large tensor, read + write) and bf16 baselines:
vLLM's Triton unified attention over a bf16 paged cache when vLLM imports, and torch SDPA over
the gathered pages and over contiguous K/V (no paging). Writes the table as JSON.

    python benchmarks/kernel_decode_attention.py --json results/kernel_decode_attention.json

Needs a CUDA GPU (no vLLM); exits with a message otherwise.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, no install
DEVICE = "cuda"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--group", type=int, default=32)
    p.add_argument("--bits", default="16,8,6,4")
    p.add_argument("--copy-mib", type=int, default=1024, help="size of the copy-bandwidth tensor")
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args()


def bench_ms(fn) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))


def copy_bandwidth(mib: int) -> float:
    """GB/s of a device-to-device torch copy, counting its read and its write."""
    x = torch.empty(mib << 20, dtype=torch.uint8, device=DEVICE)
    y = torch.empty_like(x)
    ms = bench_ms(lambda: y.copy_(x))
    return 2 * x.numel() / ms / 1e6


def paged_setup(a, gen):
    """A shuffled block table [B, blocks per request] over a pool sized for the batch, the decode
    metadata, and the query [B, Hq, D] bf16 (one new token per request)."""
    per_req = -(-a.context // a.block_size)
    table = torch.randperm(a.batch * per_req, generator=gen).reshape(a.batch, per_req)
    seq_lens = torch.full((a.batch,), a.context, dtype=torch.int32)
    qsl = torch.arange(a.batch + 1, dtype=torch.int32)
    query = torch.randn(a.batch, a.heads, a.head_dim, generator=gen).to(torch.bfloat16)
    return [t.to(DEVICE) for t in (table.to(torch.int32), seq_lens, qsl, query)]


def run_quantized(a, bits: int, table, seq_lens, qsl, query) -> dict:
    from vllm_adaspkv.kv import paged, triton_kernels
    from vllm_adaspkv.kv.paged import KVFormat

    fmt = KVFormat(bits, a.head_dim, a.group if bits != 16 else 32)
    blocks = table.numel()
    cache = torch.empty(blocks, a.kv_heads, a.block_size, fmt.token_head_bytes, dtype=torch.uint8, device=DEVICE)
    slots = (table.long()[:, :, None] * a.block_size + torch.arange(a.block_size, device=DEVICE)).flatten()
    for chunk in slots.split(1 << 16):  # fill the context with the write kernel, in chunks
        kv = torch.randn(2, chunk.numel(), a.kv_heads, a.head_dim, device=DEVICE, dtype=torch.bfloat16)
        triton_kernels.write(cache, kv[0], kv[1], chunk, fmt)
    scale = a.head_dim**-0.5
    args = (query, cache, table, seq_lens, qsl, 1, a.context, scale, fmt)
    ms = bench_ms(lambda: triton_kernels.attend(*args))
    # one check on two requests against the PyTorch reference (decodes everything: kept small)
    sub = (query[:2], cache, table[:2], seq_lens[:2], qsl[:3], 1, a.context, scale, fmt)
    err = (triton_kernels.attend(*sub).float() - paged.attend(*sub).float()).abs().max().item()
    kv_bytes = a.batch * a.context * a.kv_heads * fmt.token_head_bytes
    new_token = torch.randn(2, a.batch, a.kv_heads, a.head_dim, device=DEVICE, dtype=torch.bfloat16)
    write_ms = bench_ms(lambda: triton_kernels.write(cache, new_token[0], new_token[1], slots[:a.batch], fmt))
    return dict(name=f"adaspkv triton {bits}-bit", bits=bits, ms=ms, kv_bytes=kv_bytes,
                gbps=kv_bytes / ms / 1e6, max_abs_err_vs_paged_kv=err, write_step_ms=write_ms)


def run_baselines(a, table, seq_lens, qsl, query) -> list[dict]:
    """bf16 K/V: vLLM's unified attention (if vLLM imports), SDPA over gathered pages and over
    contiguous K/V. Same bytes to read for all three: the bf16 context."""
    blocks = table.numel()
    k_cache, v_cache = torch.randn(2, blocks, a.block_size, a.kv_heads, a.head_dim, device=DEVICE,
                                   dtype=torch.bfloat16)
    kv_bytes = 2 * a.batch * a.context * a.kv_heads * a.head_dim * 2
    scale = a.head_dim**-0.5
    rows = []

    def add(name, fn, note=""):
        ms = bench_ms(fn)
        rows.append(dict(name=name, bits=16, ms=ms, kv_bytes=kv_bytes, gbps=kv_bytes / ms / 1e6, note=note))

    try:
        from vllm.v1.attention.ops.triton_unified_attention import unified_attention

        out = torch.empty_like(query)
        call = lambda: unified_attention(  # noqa: E731
            q=query, k=k_cache, v=v_cache, out=out, cu_seqlens_q=qsl, max_seqlen_q=1, seqused_k=seq_lens,
            max_seqlen_k=a.context, softmax_scale=scale, causal=True, window_size=(-1, -1),
            block_table=table, softcap=0, q_descale=None, k_descale=None, v_descale=None)
        call()
        add("vllm unified_attention bf16", call)
    except Exception as e:  # vLLM absent (the project's GPU machines) or its API moved
        rows.append(dict(name="vllm unified_attention bf16", bits=16, ms=None, note=f"unavailable: {e!r}"[:200]))

    def gathered():
        k = k_cache[table.long()].flatten(1, 2).transpose(1, 2)  # [B, Hkv, S, D]
        v = v_cache[table.long()].flatten(1, 2).transpose(1, 2)
        return torch.nn.functional.scaled_dot_product_attention(
            query[:, :, None], k, v, scale=scale, enable_gqa=a.heads != a.kv_heads)

    add("torch sdpa bf16, pages gathered", gathered, "includes the gather copy")
    k = k_cache[table.long()].flatten(1, 2).transpose(1, 2).contiguous()
    v = v_cache[table.long()].flatten(1, 2).transpose(1, 2).contiguous()
    add("torch sdpa bf16, contiguous K/V", lambda: torch.nn.functional.scaled_dot_product_attention(
        query[:, :, None], k, v, scale=scale, enable_gqa=a.heads != a.kv_heads), "no paging")
    return rows


def main() -> int:
    a = parse_args()
    if not torch.cuda.is_available():
        print("kernel_decode_attention: no CUDA GPU visible; this benchmark only runs on one.", file=sys.stderr)
        return 2
    import triton

    gen = torch.Generator().manual_seed(0)
    table, seq_lens, qsl, query = paged_setup(a, gen)
    copy = copy_bandwidth(a.copy_mib)
    rows = [run_quantized(a, int(b), table, seq_lens, qsl, query) for b in a.bits.split(",")]
    rows += run_baselines(a, table, seq_lens, qsl, query)

    print(f"{torch.cuda.get_device_name()}: torch copy {copy:.0f} GB/s (read + write); batch {a.batch}, "
          f"context {a.context}, heads {a.heads}/{a.kv_heads}, head_dim {a.head_dim}, block {a.block_size}")
    print(f"{'kernel':38} {'ms':>8} {'KV MiB':>8} {'GB/s':>7} {'of copy':>8}  note")
    for r in rows:
        if r["ms"] is None:
            print(f"{r['name']:38} {'-':>8} {'-':>8} {'-':>7} {'-':>8}  {r['note']}")
            continue
        note = r.get("note") or (f"max |err| vs kv.paged {r['max_abs_err_vs_paged_kv']:.1e}, "
                                 f"write step {r['write_step_ms'] * 1e3:.0f} us")
        print(f"{r['name']:38} {r['ms']:8.3f} {r['kv_bytes'] / 2**20:8.0f} {r['gbps']:7.0f} "
              f"{r['gbps'] / copy:8.0%}  {note}")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(dict(
            device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
            python=platform.python_version(), args={k: str(v) for k, v in vars(a).items()},
            copy_gbps=copy, rows=rows), indent=2))
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
