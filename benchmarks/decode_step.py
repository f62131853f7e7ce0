"""Decode-step benchmark (not vLLM's): a LLaVA-1.5-7B-shaped language model at a fixed KV budget.

LLaVA-1.5-7B's language model in shape (Llama-2-7B: hidden 4096, 32 layers, 32 heads and KV heads,
head_dim 128, MLP 11008, vocab 32000) with random bf16 weights: PyTorch linears, RMSNorm (unit gain),
RoPE, SiLU MLP, attention through this plugin's Triton kernels (vllm_adaspkv.kv.triton_kernels) over a paged
cache. Every plan gets the same KV budget (default 16 GiB, for the layers instantiated: --layers 8
at 16 GiB holds 4x the requests of 32 layers), and the most requests of `context` + new tokens that
fit: bf16 is capacity-bound, a smaller cache runs a larger batch. Each request's first `context`
tokens are random K/V (no real prefill); then `steps` whole-model decode steps (embedding, layers,
norm, lm head, greedy argmax) are timed with CUDA events, optionally as one CUDA graph. Output
tokens/s = batch / step time. One forward per step, no scheduler or sampling: not vLLM's throughput.

Plans (--plans, comma separated); "vs bf16" divides by the better of the 16-bit rows:
    sdpa-bf16   no kernels: bf16 K/V in contiguous per-request buffers, torch SDPA under a length mask
    bf16 or 16  the kernels' 16-bit format, which stores raw fp16 rows (the model runs in bf16)
    8, 6, 4, 2  every layer at that width (groups of --group values, fp16 scale and zero per group)
    mixed:8/4   bits per layer, the list cycled over the layers (8, 4, 8, 4, ...)
Each kernel plan's first step is checked call by call against kv.paged (the PyTorch reference), and
layer 0 of bf16's against sdpa-bf16's; a failed check makes the exit code 1.

    python benchmarks/decode_step.py --cuda-graph --json results/decode_step.json
    python benchmarks/decode_step.py --dry-run   # tiny shapes on CPU, kernels under TRITON_INTERPRET=1

Needs a CUDA GPU (PyTorch + Triton, no vLLM); without one it exits with code 2 unless --dry-run.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

if "--dry-run" in sys.argv[1:]:  # Triton picks interpreter or compiler when it is first imported
    os.environ["TRITON_INTERPRET"] = "1"

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, no install
from vllm_adaspkv.kv.paged import KVFormat  # noqa: E402

BF16 = torch.bfloat16
# Small enough for the interpreter (~10 ms per program per page on a busy core): 2 pages of context,
# batches of 2 (16-bit) to 8 (4-bit); 2 KV heads for 4 query heads so the GQA wiring is exercised.
DRY_RUN = dict(layers=2, hidden=256, heads=4, kv_heads=2, head_dim=64, mlp=512, vocab=1000,
               kv_budget_bytes=128 << 10, context=32, steps=2, warmup=1)
CHECK_TOL = 1e-3  # kernel vs kv.paged attention in fp32: max |difference| over max |reference|
CROSS_TOL = 2e-2  # kernels' 16-bit vs sdpa-bf16, bf16 outputs: about 2.5 units of bf16's last bit


@dataclass(frozen=True)
class Plan:
    name: str
    bits: tuple[int, ...]  # one per instantiated layer
    sdpa: bool = False  # torch SDPA over contiguous bf16 buffers instead of the kernels

    @classmethod
    def parse(cls, text: str, layers: int) -> Plan:
        if text == "sdpa-bf16":
            return cls(text, (16,) * layers, sdpa=True)
        words = text.removeprefix("mixed:").split("/")
        cycle = [16 if w == "bf16" else int(w) if w.isdigit() else 0 for w in words]
        if any(b not in (16, 8, 6, 4, 2) for b in cycle) or (len(cycle) > 1 and not text.startswith("mixed:")):
            raise ValueError(f"plan {text!r}: expected sdpa-bf16, bf16, 16, 8, 6, 4, 2 or mixed:B/B/...")
        return cls(text, tuple(cycle[i % len(cycle)] for i in range(layers)))


@dataclass(frozen=True)
class Config:
    layers: int = 32
    hidden: int = 4096
    heads: int = 32
    kv_heads: int = 32
    head_dim: int = 128
    mlp: int = 11008
    vocab: int = 32000
    kv_budget_bytes: int = 16 << 30  # for the layers instantiated
    context: int = 4096
    steps: int = 32
    warmup: int = 3
    block_size: int = 16
    group: int = 32
    max_batch: int = 1024
    plans: tuple[str, ...] = ("sdpa-bf16", "bf16", "8", "6", "4", "mixed:8/4")
    rotate_keys: bool = False
    cuda_graph: bool = False
    check: bool = True
    dry_run: bool = False
    seed: int = 0

    def __post_init__(self):
        for name in ("layers", "hidden", "heads", "kv_heads", "head_dim", "mlp", "vocab", "kv_budget_bytes",
                     "context", "steps", "warmup", "block_size", "group", "max_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be >= 1")
        if self.hidden != self.heads * self.head_dim or self.heads % self.kv_heads or self.head_dim % 2:
            raise ValueError(f"expected hidden {self.hidden} = heads {self.heads} x head_dim {self.head_dim} "
                             f"(even), heads a multiple of kv_heads {self.kv_heads}")
        if not self.plans:
            raise ValueError("--plans: at least one")
        for plan in self.parsed_plans():
            self.formats(plan)  # raises on a layout the quantizer rejects (group vs head_dim)

    @property
    def new_tokens(self) -> int:
        """Tokens each request appends: warm-up, timed steps and the checked first step."""
        return self.warmup + self.steps + int(self.check)

    def parsed_plans(self) -> list[Plan]:
        return [Plan.parse(p, self.layers) for p in self.plans]

    def formats(self, plan: Plan) -> list[KVFormat]:
        return [KVFormat(b, self.head_dim, self.group, self.rotate_keys and b != 16) for b in plan.bits]


def capacity(cfg: Config, plan: Plan) -> dict:
    """vLLM's accounting: the budget buys whole blocks (a page of block_size tokens in every layer)
    and a request owns whole blocks. sdpa-bf16's buffers hold the 16-bit row's bytes per token
    (K and V, 2 * 2 * head_dim), so it gets the 16-bit batch."""
    token_bytes = sum(cfg.kv_heads * f.token_head_bytes for f in cfg.formats(plan))  # all layers, K+V
    num_blocks = cfg.kv_budget_bytes // (cfg.block_size * token_bytes)
    per_request = -(-(cfg.context + cfg.new_tokens) // cfg.block_size)
    max_batch = num_blocks // per_request
    return dict(bytes_per_token=token_bytes, num_blocks=num_blocks, blocks_per_request=per_request,
                max_batch=max_batch, batch=min(max_batch, cfg.max_batch))


class Model:
    """Random weights [out, in] as nn.Linear keeps them; std 1/sqrt(in) keeps activations O(1)."""

    def __init__(self, cfg: Config, device: str):
        g = torch.Generator(device).manual_seed(cfg.seed)

        def w(out: int, inp: int, std: float) -> torch.Tensor:
            return torch.randn(out, inp, generator=g, device=device, dtype=BF16).mul_(std)

        d, kv = cfg.hidden, cfg.kv_heads * cfg.head_dim
        self.embed, self.lm_head = w(cfg.vocab, d, 1.0), w(cfg.vocab, d, d**-0.5)
        self.layers = [dict(qkv=w(d + 2 * kv, d, d**-0.5), o=w(d, d, d**-0.5),  # qkv: fused q | k | v
                            gate_up=w(2 * cfg.mlp, d, d**-0.5), down=w(d, cfg.mlp, cfg.mlp**-0.5))
                       for _ in range(cfg.layers)]
        self.inv_freq = 1.0 / 10000 ** (torch.arange(0, cfg.head_dim, 2, device=device) / cfg.head_dim)


def rms_norm(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, D], cos/sin [B, 1, D/2]: Llama's rotate-half convention."""
    x1, x2 = x.float().chunk(2, -1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).to(x.dtype)


class Decoder:
    """One plan's caches and decode state. What a step changes lives in fixed buffers updated in
    place, and the kernels read lengths on the device (no host sync): a step can be a CUDA graph."""

    def __init__(self, cfg: Config, model: Model, plan: Plan, cap: dict, device: str):
        self.cfg, self.model, self.plan, self.fmts = cfg, model, plan, cfg.formats(plan)
        b, per_req = cap["batch"], cap["blocks_per_request"]
        # pages shuffled over the whole pool, as an allocator hands them out after some churn
        table = torch.randperm(cap["num_blocks"], generator=torch.Generator().manual_seed(cfg.seed + 1))
        self.table = table[:b * per_req].reshape(b, per_req).to(device, torch.int32)  # [B, pages]
        self.max_seq_len = per_req * cfg.block_size
        self.pos = torch.full((b,), cfg.context, dtype=torch.long, device=device)  # [B] new token's position
        self.seq_lens = torch.empty(b, dtype=torch.int32, device=device)  # [B] counting the new token
        self.qsl = torch.arange(b + 1, dtype=torch.int32, device=device)  # one query token per request
        self.rows, self.key_pos = torch.arange(b, device=device), torch.arange(self.max_seq_len, device=device)
        tokens = torch.randint(cfg.vocab, (b,), generator=torch.Generator().manual_seed(cfg.seed + 2))
        self.tokens = tokens.to(device)  # [B] last sampled: the same in plans of the same batch
        if plan.sdpa:  # per layer K and V [2, B, Hkv, S, D], zeroed: SDPA spreads a NaN past the mask
            self.caches = [torch.zeros(2, b, cfg.kv_heads, self.max_seq_len, cfg.head_dim, dtype=BF16,
                                       device=device) for _ in self.fmts]
        else:  # per layer the whole budget's pool, as vLLM allocates it: [blocks, Hkv, N, C], unzeroed
            self.caches = [torch.empty(cap["num_blocks"], cfg.kv_heads, cfg.block_size, f.token_head_bytes,
                                       dtype=torch.uint8, device=device) for f in self.fmts]

    def fill(self, ops) -> None:
        """Random K/V for each request's first `context` tokens, from a generator per layer: the same
        values in plans of the same batch, so their first steps compare."""
        cfg, b, dev, bs = self.cfg, self.tokens.shape[0], self.pos.device, self.cfg.block_size
        p = torch.arange(cfg.context, device=dev)
        slots = (self.table.long()[:, p // bs] * bs + p % bs).flatten()  # [B * context], by request
        for i, (cache, fmt) in enumerate(zip(self.caches, self.fmts)):
            g = torch.Generator(dev).manual_seed(cfg.seed + 100 + i)
            kv = torch.randn(2, b, cfg.context, cfg.kv_heads, cfg.head_dim, generator=g, dtype=BF16, device=dev)
            if self.plan.sdpa:
                cache[:, :, :, :cfg.context] = kv.transpose(2, 3)  # [2, B, Hkv, context, D]
            else:
                ops.write(cache, kv[0].flatten(0, 1), kv[1].flatten(0, 1), slots, fmt)

    def step(self, ops) -> torch.Tensor:
        """Every request's next token; ops: vllm_adaspkv.kv.triton_kernels, or Checked. -> logits [B, vocab]."""
        cfg, m, b, bs = self.cfg, self.model, self.tokens.shape[0], self.cfg.block_size
        self.seq_lens.copy_(self.pos + 1)  # the new token is in the cache before attention reads it
        slots = self.table.gather(1, (self.pos // bs)[:, None]).squeeze(1).long() * bs + self.pos % bs  # [B]
        angle = self.pos[:, None].float() * m.inv_freq  # [B, D/2], shared by all layers
        cos, sin = angle.cos()[:, None], angle.sin()[:, None]
        if self.plan.sdpa:  # [B, 1, 1, S] additive mask, once per step
            bias = torch.zeros(b, 1, 1, self.max_seq_len, dtype=BF16, device=slots.device).masked_fill_(
                (self.key_pos[None] > self.pos[:, None])[:, None, None], float("-inf"))
        scale, gqa = cfg.head_dim**-0.5, dict(enable_gqa=True) if cfg.heads != cfg.kv_heads else {}
        x = m.embed[self.tokens]  # [B, hidden]
        for i, (w, fmt, cache) in enumerate(zip(m.layers, self.fmts, self.caches)):
            qkv = F.linear(rms_norm(x), w["qkv"]).view(b, cfg.heads + 2 * cfg.kv_heads, cfg.head_dim)
            q, k, v = qkv.split([cfg.heads, cfg.kv_heads, cfg.kv_heads], 1)  # [B, H, D], [B, Hkv, D] x2
            q, k = rope(q, cos, sin), rope(k, cos, sin)
            if self.plan.sdpa:
                cache[0][self.rows, :, self.pos] = k  # [B, Hkv, D] at each request's position
                cache[1][self.rows, :, self.pos] = v
                o = F.scaled_dot_product_attention(q[:, :, None], cache[0], cache[1], attn_mask=bias,
                                                   scale=scale, **gqa)[:, :, 0]  # [B, H, D]
            else:
                ops.write(cache, k, v, slots, fmt)
                o = ops.attend(q, cache, self.table, self.seq_lens, self.qsl, 1, self.max_seq_len, scale, fmt)
            if i == 0:
                self.attn0 = o  # [B, H, D], for cross_check
            x = x + F.linear(o.reshape(b, -1), w["o"])
            gate, up = F.linear(rms_norm(x), w["gate_up"]).chunk(2, -1)  # [B, MLP] each
            x = x + F.linear(F.silu(gate) * up, w["down"])
        logits = F.linear(rms_norm(x), m.lm_head)  # [B, vocab]
        self.tokens.copy_(logits.argmax(-1))  # greedy
        self.pos.add_(1)
        return logits


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


class Checked:
    """The ops of a plan's first step: the kernels' results go on, each call compared with kv.paged's
    (the PyTorch reference) on the same inputs, so no difference carries between layers (bf16
    rounding noise grown through 32 layers of logits would swamp any useful tolerance)."""

    def __init__(self, kernels, reference):
        self.kernels, self.ref, self.bad_rows, self.attn_err = kernels, reference, 0, 0.0

    def write(self, cache, key, value, slots, fmt):
        self.kernels.write(cache, key, value, slots, fmt)
        stored = cache[slots // cache.shape[2], :, slots % cache.shape[2]]  # [B, Hkv, C]
        self.bad_rows += int((stored != self.ref.encode(key, value, fmt)).any(-1).sum())  # same bytes

    def attend(self, query, *args):
        # compared in fp32: in bf16 the two may differ in the last bit (0.8 %). The kernel accumulates
        # in fp32 and rounds at the store: on a GPU (round to nearest even, as .to) its bf16 output
        # is this one rounded; the interpreter's store truncates instead
        out = self.kernels.attend(query.float(), *args)
        self.attn_err = max(self.attn_err, rel_err(out, self.ref.attend(query.float(), *args)))
        return out.to(query.dtype)


def time_steps(cfg: Config, dec: Decoder, kernels) -> tuple[float, str]:
    """Mean ms per decode step, and how it ran (eager, CUDA graph, or why the capture failed)."""
    fn, how, cuda = (lambda: dec.step(kernels)), "eager", not cfg.dry_run
    side = torch.cuda.Stream() if cuda else None  # warm-up (Triton compiles, cuBLAS sets up) off the
    if cuda:  # stream a capture runs on
        side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side) if cuda else contextlib.nullcontext():
        for _ in range(cfg.warmup):
            fn()
    if cuda:
        torch.cuda.current_stream().wait_stream(side)
    if cuda and cfg.cuda_graph:
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):  # records only: positions do not advance
                fn()
            fn, how = graph.replay, "cuda graph"
        except Exception as e:  # noqa: BLE001  (whatever failed: time eagerly, say so loudly)
            torch.cuda.synchronize()
            how = f"eager: CUDA graph capture FAILED ({e!r})"[:300]
            print(f"!!! {dec.plan.name}: {how}", file=sys.stderr)
    if not cuda:
        t = time.perf_counter()
        for _ in range(cfg.steps):
            fn()
        return (time.perf_counter() - t) * 1e3 / cfg.steps, "eager (CPU, Triton interpreter)"
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(cfg.steps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / cfg.steps, how


def run_plan(cfg: Config, model: Model, plan: Plan, device: str, kernels, reference):
    """-> the plan's row, and layer 0's attention [B, H, D] in its first step (None unchecked)."""
    cap = capacity(cfg, plan)
    if cap["batch"] < 1:
        raise SystemExit(f"plan {plan.name}: the KV budget holds no request of {cfg.context} + "
                         f"{cfg.new_tokens} tokens ({cap['num_blocks']} blocks)")
    row = dict(plan=plan.name, mean_bits=sum(plan.bits) / len(plan.bits), bits=list(plan.bits), **cap)
    first = None
    dec = Decoder(cfg, model, plan, cap, device)
    dec.fill(reference if cfg.dry_run else kernels)  # same bytes; the interpreter would take minutes
    if cfg.check:
        ops = kernels if plan.sdpa else Checked(kernels, reference)
        dec.step(ops)
        first = dec.attn0.clone()
        if not plan.sdpa:
            row.update(check_attn_rel_err=ops.attn_err, check_write_bad_rows=ops.bad_rows,
                       check_ok=ops.attn_err <= CHECK_TOL and ops.bad_rows == 0)
    row["step_ms"], row["ran_as"] = time_steps(cfg, dec, kernels)
    row["tokens_per_s"] = cap["batch"] / row["step_ms"] * 1e3
    del dec
    if device == "cuda":
        torch.cuda.empty_cache()  # the next plan's pool takes the same budget
    return row, first


def cross_check(rows: list[dict], firsts: list) -> dict | None:
    """Layer 0's attention in the first step of sdpa-bf16 (plain torch, contiguous bf16) and of the
    kernels' 16-bit plan (paged, fp16 rows): same weights, tokens, context values and batch, so this
    checks the kernel path's pages, slots, positions and lengths against an independent attention."""
    idx = {r["plan"]: i for i, r in enumerate(rows)}
    a, b = idx.get("sdpa-bf16"), idx.get("bf16", idx.get("16"))
    if a is None or b is None or firsts[a] is None or firsts[b] is None:
        return None
    err = rel_err(firsts[b], firsts[a])
    return dict(plans=[rows[b]["plan"], "sdpa-bf16"], layer=0, rel_err=err, ok=err <= CROSS_TOL)


def parse_args() -> tuple[Config, Path | None]:
    d, p = Config(), argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name in ("layers", "hidden", "heads", "kv_heads", "head_dim", "mlp", "vocab", "context", "steps",
                 "warmup", "block_size", "group", "max_batch", "seed"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    p.add_argument("--kv-budget-gib", type=float, default=d.kv_budget_bytes / 2**30,
                   help="KV cache for the layers instantiated (for --layers L to mimic 32, scale it by L/32)")
    p.add_argument("--plans", default=",".join(d.plans))
    p.add_argument("--rotate-keys", action="store_true", help="quantized layers store keys Hadamard-rotated")
    p.add_argument("--cuda-graph", action="store_true", help="capture one step, time its replays")
    p.add_argument("--no-check", action="store_true", help="skip the first step's checks")
    p.add_argument("--dry-run", action="store_true", help=f"CPU, Triton interpreter; sets {', '.join(DRY_RUN)}")
    p.add_argument("--json", type=Path, default=None)
    a = vars(p.parse_args())
    out, budget, no_check = a.pop("json"), a.pop("kv_budget_gib"), a.pop("no_check")
    cfg = Config(**{**a, "plans": tuple(a["plans"].split(",")), "kv_budget_bytes": int(budget * 2**30),
                    "check": not no_check})
    return (replace(cfg, **DRY_RUN) if cfg.dry_run else cfg), out


def main() -> int:
    try:
        cfg, out = parse_args()
    except ValueError as e:
        print(f"decode_step: {e}", file=sys.stderr)
        return 2
    if not cfg.dry_run and not torch.cuda.is_available():
        print("decode_step: no CUDA GPU visible; this benchmark only runs on one (--dry-run: tiny shapes "
              "on CPU under the Triton interpreter).", file=sys.stderr)
        return 2
    import triton

    from vllm_adaspkv.kv import paged, triton_kernels

    device = "cpu" if cfg.dry_run else "cuda"
    model = Model(cfg, device)
    rows, firsts = zip(*(run_plan(cfg, model, plan, device, triton_kernels, paged) for plan in cfg.parsed_plans()))
    rows, cross = list(rows), cross_check(rows, firsts)
    bf16 = max((r["tokens_per_s"] for r in rows if r["mean_bits"] == 16), default=None)
    for r in rows:
        r["vs_bf16"] = r["tokens_per_s"] / bf16 if bf16 else None

    name = "CPU (Triton interpreter)" if cfg.dry_run else torch.cuda.get_device_name()
    print(f"decode-step benchmark (one model forward per step, not vLLM) on {name}: {cfg.layers} layers, hidden "
          f"{cfg.hidden}, heads {cfg.heads}/{cfg.kv_heads}, KV budget {cfg.kv_budget_bytes / 2**30:.4g} GiB for "
          f"these layers, context {cfg.context} + {cfg.new_tokens} new tokens, block {cfg.block_size}")
    print(f"{'plan':11} {'bits':>5} {'KiB/tok':>8} {'blocks':>7} {'batch':>5} {'step ms':>8} {'tok/s':>8} "
          f"{'vs bf16':>7}  check; ran as")
    for r in rows:
        check = (f"attn {r['check_attn_rel_err']:.0e}, {r['check_write_bad_rows']} bad rows: "
                 f"{'ok' if r['check_ok'] else 'FAILED'}") if "check_ok" in r else "-"
        ratio = f"{r['vs_bf16']:.2f}" if r["vs_bf16"] else "-"
        print(f"{r['plan']:11} {r['mean_bits']:5.2f} {r['bytes_per_token'] / 1024:8.1f} {r['num_blocks']:7d} "
              f"{r['batch']:5d} {r['step_ms']:8.2f} {r['tokens_per_s']:8.1f} {ratio:>7}  {check}; {r['ran_as']}")
    if cross:
        print(f"first step, layer 0 attention, {cross['plans'][0]} (kernels) vs sdpa-bf16 (torch): "
              f"rel err {cross['rel_err']:.1e}: {'ok' if cross['ok'] else 'FAILED'}")
    if cfg.dry_run:
        print("dry run: no timings are meaningful")
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(dict(
            benchmark="decode step (one model forward per step; not vLLM serving throughput)", device=name,
            torch=torch.__version__, triton=triton.__version__, python=platform.python_version(),
            config=asdict(cfg), new_tokens=cfg.new_tokens, rows=rows, cross_check=cross,
            notes="kv_budget_bytes is for the layers instantiated; plan bf16/16 stores fp16 rows"), indent=2))
        print(f"wrote {out}")
    return 0 if all(r.get("check_ok", True) for r in rows) and (cross or {}).get("ok", True) else 1


if __name__ == "__main__":
    sys.exit(main())
