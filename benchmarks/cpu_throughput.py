"""`vllm bench throughput` on CPU, capacity-bound: stock vLLM's KV caches against the plugin's plans.

Every configuration runs vLLM's own benchmark (`vllm bench throughput`, random multimodal prompts: one
image and a random text per request, a fixed number of output tokens each, greedy, EOS ignored) in a
fresh process with the same small `--kv-cache-memory-bytes`, so that the cache, not the compute,
limits how many requests vLLM's scheduler runs at once. A cache that holds more tokens runs larger
batches; on a 2-core CPU a decode step of a small model costs about the same for 4 or 40 requests,
so requests/s follows. The rows, side by side in one run:

    stock bf16      vLLM's KV cache in the model dtype
    stock fp8       vLLM's own quantized KV cache (--kv-cache-dtype fp8)
    plugin N-bit    `vllm bench throughput --model ART_DIR --plugin adaspkv --tokenizer BASE_DIR`,
                    every layer at N bits
    plugin fp8      the same, every layer in the plugin's fp8 tier (float8 e4m3 values, no scales:
                    vLLM's fp8 bytes, `--kv-eight-bit fp8_e4m3`)

Artifacts are made with `adaspkv prune` (magnitude, 50 % sparsity; masked weights cost vLLM the same
time as dense ones, so only the KV plan matters here). Reproduce:

    .venv/bin/python benchmarks/cpu_throughput.py --out results/cpu-throughput
    .venv/bin/python benchmarks/cpu_throughput.py --model smol-llava --plugin-plans 8,fp8,6,4 \
        --kv-cache-memory-bytes 23068672,184549376 --enforce-eager --out results/cpu-throughput-smol

Where each step's time goes (--profile DIR, instead of the timed runs): every configuration runs
once under vLLM's own profiler (`vllm bench throughput --profile`: torch.profiler inside the
worker, over the whole run), and DIR gets each worker's table of operators by self CPU time (the
plugin's C++ kernels are registered ops, adaspkv_kv::*, so they are rows of it) and profile.md,
the largest operators' shares side by side. The profiler slows a run down; no requests/s is
reported from it.

    .venv/bin/python benchmarks/cpu_throughput.py --model smol-llava --plugin-plans 6 --no-fp8 \
        --kv-cache-memory-bytes 184549376 --enforce-eager --num-prompts 32 --profile results/cpu-profile-smol
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VLLM = Path(sys.executable).parent / "vllm"
ADASPKV = Path(sys.executable).parent / "adaspkv"
CAPACITY_LINE = re.compile(r"KV cache size: ([\d,]+) tokens")


@dataclass(frozen=True)
class BenchConfig:
    model: str = "shapes-llava"
    out: Path = REPO / "results" / "cpu-throughput"
    workdir: Path = REPO / "runs" / "cpu-throughput"
    plugin_plans: tuple[str, ...] = ("8", "6", "4")  # uniform bits, or "fp8" (the 8-bit fp8 tier)
    kv_group: int = 32  # shapes-llava head_dim: one scale and zero per head vector
    kv_cache_memory_bytes: tuple[int, ...] = (1 << 20, 4 << 20)  # one table per budget
    dtype: str = "bfloat16"
    num_prompts: int = 64
    input_len: int = 48  # random text tokens; the 64x64 image adds 4 image tokens
    output_len: int = 128
    max_model_len: int = 256
    fp8_baseline: bool = True
    enforce_eager: bool = False  # every configuration alike: skips vLLM's torch.compile warm-up
    # Every configuration runs this many times, round-robin: on a shared 2-core machine one run of
    # the same command varies by up to 40% (stock at 1 MiB: 3.7 to 6.1 requests/s in four runs)
    repeats: int = 3
    profile: Path | None = None  # where the profiled runs write their tables (see --profile)

    def __post_init__(self):
        allowed = ("16", "8", "6", "4", "2", "fp8")
        if not self.plugin_plans or any(p not in allowed for p in self.plugin_plans):
            raise ValueError(f"--plugin-plans {','.join(self.plugin_plans)}: each one of {', '.join(allowed)}")
        for name in ("num_prompts", "input_len", "output_len", "kv_group", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be >= 1")
        if not self.kv_cache_memory_bytes or min(self.kv_cache_memory_bytes) < 1 << 20:
            raise ValueError(f"--kv-cache-memory-bytes {self.kv_cache_memory_bytes}: each must be >= 1 MiB")


@dataclass(frozen=True)
class Row:
    name: str
    model: str  # what --model got
    extra: tuple[str, ...] = ()
    kv_cache_memory_bytes: int = 0


def model_dir(config: BenchConfig) -> str:
    from offline_search.data.bundled_models import resolve_model

    return str(resolve_model(config.model))


def make_artifact(config: BenchConfig, plan: str) -> Path:
    """A uniform artifact, every layer at `plan` ("4", ..., or "fp8"); reused when it exists."""
    out = config.workdir / f"artifact-{config.model}-{plan}{'' if plan == 'fp8' else 'bit'}-g{config.kv_group}"
    kv = ["--kv-bits", "8", "--kv-eight-bit", "fp8_e4m3"] if plan == "fp8" else ["--kv-bits", plan]
    if not (out / "adaspkv.json").is_file():
        # magnitude needs no calibration statistics; the few windows only feed the export's objective line
        command = [str(ADASPKV), "prune", "--model", config.model, "--sparsity", "0.5", "--metric", "magnitude",
                   *kv, "--kv-group", str(config.kv_group), "--out", str(out), "--seq-len", "256",
                   "--calibration-windows", "2", "--calibration-samples", "2", "--objective-windows", "2",
                   "--objective-samples", "2"]
        print("$", shlex.join(command), flush=True)
        subprocess.run(command, check=True)
    return out


def rows(config: BenchConfig) -> list[Row]:
    base = model_dir(config)
    configurations = [("stock", base, ())]
    if config.fp8_baseline:
        configurations.append(("stock fp8", base, ("--kv-cache-dtype", "fp8")))
    for plan in config.plugin_plans:
        # --tokenizer: `vllm bench` loads one from --model itself, and an artifact holds none
        configurations.append((f"plugin {plan}{'' if plan == 'fp8' else '-bit'}", str(make_artifact(config, plan)),
                               ("--plugin", "adaspkv", "--tokenizer", base)))
    return [Row(name, model, extra, budget) for budget in config.kv_cache_memory_bytes
            for name, model, extra in configurations]


PROFILE_ROW = re.compile(r"^\s*(\S.*?)\s{2,}([\d.]+)%\s")  # operator name, self CPU %
PROFILE_TOTAL = re.compile(r"^Self CPU time total: ([\d.]+)(us|ms|s)$", re.MULTILINE)
TOTAL = "self CPU time of all operators, s"


def profiler_flags(trace_dir: Path) -> tuple[str, ...]:
    """vLLM's torch profiler in the worker; without stacks (they double a CPU run's time)."""
    settings = {"profiler": "torch", "torch_profiler_dir": str(trace_dir.resolve()),
                "torch_profiler_with_stack": False, "torch_profiler_use_gzip": True}
    return ("--profile", "--profiler-config", json.dumps(settings))


def profile_row(config: BenchConfig, row: Row) -> dict[str, float]:
    """One profiled run of `row`: its worker's table copied to the profile folder; returns
    operator -> share of the worker's self CPU time (%), and TOTAL -> that time in seconds."""
    slug = f"{row.name.replace(' ', '-')}-{row.kv_cache_memory_bytes >> 10}KiB"
    trace_dir = config.workdir / "profiles" / slug
    shutil.rmtree(trace_dir, ignore_errors=True)
    command = [*bench_command(config, row, config.workdir / f"{slug}-profiled.json"), *profiler_flags(trace_dir)]
    log = config.workdir / f"{slug}-profiled.log"
    run_bench(command, log, f"{row.name} (profiled)")
    tables = sorted(trace_dir.glob("*.profiler_out.txt"))
    if not tables:
        raise SystemExit(f"{row.name}: the profiled run wrote no operator table to {trace_dir}, log {log}")
    text = tables[0].read_text()
    (config.profile / f"{slug}.txt").write_text(text)
    return read_profile(text)


def read_profile(text: str) -> dict[str, float]:
    """A torch.profiler table (by self CPU time) -> operator -> share (%), and TOTAL -> seconds."""
    shares = {m[1]: float(m[2]) for line in text.splitlines() if (m := PROFILE_ROW.match(line))}
    if total := PROFILE_TOTAL.search(text):
        shares[TOTAL] = float(total[1]) / {"us": 1e6, "ms": 1e3, "s": 1.0}[total[2]]
    return shares


def profile_table(shares: dict[str, dict[str, float]], top: int = 12) -> str:
    """The `top` operators of each configuration, their self CPU shares side by side, under the
    total self CPU time of each."""
    names: list[str] = []
    for ops in shares.values():
        ranked = sorted((n for n in ops if n != TOTAL), key=ops.get, reverse=True)
        names += [n for n in ranked[:top] if n not in names]
    lines = ["| operator | " + " | ".join(shares) + " |", "| --- |" + " ---: |" * len(shares),
             f"| {TOTAL} | " + " | ".join(f"{ops.get(TOTAL, float('nan')):.2f}" for ops in shares.values()) + " |"]
    lines += [f"| `{n}` | " + " | ".join(f"{ops.get(n, 0.0):.1f} %" for ops in shares.values()) + " |" for n in names]
    return "\n".join(lines)


def bench_command(config: BenchConfig, row: Row, output_json: Path) -> list[str]:
    # the multimodal prompts (one 64x64 image: 4 image tokens of shapes-llava) are vLLM's random-mm dataset
    return [str(VLLM), "bench", "throughput", "--model", row.model, *row.extra,
            "--dataset-name", "random-mm", "--num-prompts", str(config.num_prompts),
            "--random-input-len", str(config.input_len), "--random-output-len", str(config.output_len),
            "--random-range-ratio", "0", "--random-mm-base-items-per-request", "1",
            "--random-mm-limit-mm-per-prompt", '{"image": 1, "video": 0}',
            "--random-mm-bucket-config", "{(64, 64, 1): 1.0}",
            "--kv-cache-memory-bytes", str(row.kv_cache_memory_bytes), "--dtype", config.dtype,
            "--max-model-len", str(config.max_model_len), "--seed", "0", "--output-json", str(output_json),
            *(["--enforce-eager"] if config.enforce_eager else [])]


def run_bench(command: list[str], log: Path, what: str) -> str:
    """Runs one `vllm bench throughput` process with its output in `log`; returns the log's text, or
    stops the benchmark with the log's last lines when the run failed."""
    print("$", shlex.join(command), flush=True)
    with open(log, "w") as f:
        done = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
    text = log.read_text(errors="replace")
    if done.returncode != 0:
        tail = "\n".join(text.splitlines()[-20:])
        raise SystemExit(f"{what}: `vllm bench throughput` failed (exit {done.returncode}), log {log}:\n{tail}")
    return text


def run_row(config: BenchConfig, row: Row, repeat: int) -> dict:
    slug = f"{row.name.replace(' ', '-')}-{row.kv_cache_memory_bytes >> 10}KiB-run{repeat}"
    output_json = config.workdir / f"{slug}.json"
    log = config.workdir / f"{slug}.log"
    command = bench_command(config, row, output_json)
    start = time.monotonic()
    text = run_bench(command, log, row.name)
    capacity = CAPACITY_LINE.findall(text)
    if not capacity:
        raise SystemExit(f"{row.name}: no 'KV cache size: N tokens' line in {log}")
    result = json.loads(output_json.read_text())
    return {"name": row.name, "kv_cache_memory_bytes": row.kv_cache_memory_bytes, "repeat": repeat,
            "command": command, "kv_cache_tokens": int(capacity[-1].replace(",", "")),
            "requests_per_second": result["requests_per_second"],
            "output_tokens_per_second": config.num_prompts * config.output_len / result["elapsed_time"],
            "elapsed_s": result["elapsed_time"], "wall_s": time.monotonic() - start}


def table(results: list[dict]) -> str:
    """One row per configuration: the median over its runs (and their range); the ratio is of
    medians, against stock at the same KV budget."""
    runs: dict[tuple[int, str], list[dict]] = {}
    for r in results:
        runs.setdefault((r["kv_cache_memory_bytes"], r["name"]), []).append(r)

    def median(group: list[dict], field: str) -> float:
        return statistics.median(r[field] for r in group)

    lines = ["| KV budget | configuration | KV cache tokens | requests/s, median (range) | output tokens/s | "
             "requests/s vs stock |", "| ---: | --- | ---: | ---: | ---: | ---: |"]
    for (budget, name), group in runs.items():
        rps = [r["requests_per_second"] for r in group]
        ratio = median(group, "requests_per_second") / median(runs[budget, "stock"], "requests_per_second")
        lines.append(f"| {budget / 2**20:g} MiB | {name} | {group[0]['kv_cache_tokens']:,} | "
                     f"{statistics.median(rps):.3f} ({min(rps):.2f}-{max(rps):.2f}) | "
                     f"{median(group, 'output_tokens_per_second'):.1f} | {ratio:.2f}x |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> BenchConfig:
    d = BenchConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=d.model, help="bundled model name or LLaVA directory (default: %(default)s)")
    p.add_argument("--out", type=Path, default=d.out, help="results folder (default: %(default)s)")
    p.add_argument("--workdir", type=Path, default=d.workdir, help="artifacts and logs (default: %(default)s)")
    p.add_argument("--plugin-plans", default=",".join(d.plugin_plans),
                   help="uniform plugin plans to run, comma-separated bits or fp8 (default: %(default)s)")
    p.add_argument("--kv-group", type=int, default=d.kv_group, help="KV quantization group (default: %(default)s)")
    p.add_argument("--kv-cache-memory-bytes", default=",".join(map(str, d.kv_cache_memory_bytes)),
                   help="KV budgets, comma-separated; every configuration runs at each (default: %(default)s)")
    p.add_argument("--dtype", default=d.dtype, help="model dtype (default: %(default)s)")
    p.add_argument("--num-prompts", type=int, default=d.num_prompts, help="(default: %(default)s)")
    p.add_argument("--input-len", type=int, default=d.input_len, help="random text tokens (default: %(default)s)")
    p.add_argument("--output-len", type=int, default=d.output_len, help="(default: %(default)s)")
    p.add_argument("--no-fp8", action="store_true", help="leave out stock vLLM's fp8 KV cache")
    p.add_argument("--enforce-eager", action="store_true",
                   help="every configuration without vLLM's torch.compile (its warm-up is ~1 minute a run for "
                        "smol-llava's 30 layers)")
    p.add_argument("--repeats", type=int, default=d.repeats, help="runs of each configuration, round-robin "
                   "(default: %(default)s)")
    p.add_argument("--profile", type=Path, metavar="DIR", help="instead of the timed runs, one run of each "
                   "configuration under vLLM's torch profiler; tables of operators by self CPU time to DIR")
    a = p.parse_args(argv)
    try:
        budgets = tuple(int(b) for b in a.kv_cache_memory_bytes.split(","))
    except ValueError:
        p.error(f"--kv-cache-memory-bytes {a.kv_cache_memory_bytes!r}: comma-separated integers")
    plans = tuple(a.plugin_plans.split(","))
    return BenchConfig(model=a.model, out=a.out, workdir=a.workdir, plugin_plans=plans, kv_group=a.kv_group,
                       kv_cache_memory_bytes=budgets, dtype=a.dtype, num_prompts=a.num_prompts,
                       input_len=a.input_len, output_len=a.output_len, fp8_baseline=not a.no_fp8,
                       repeats=a.repeats, enforce_eager=a.enforce_eager,
                       profile=a.profile)


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    config.workdir.mkdir(parents=True, exist_ok=True)
    if config.profile:
        config.profile.mkdir(parents=True, exist_ok=True)
        shares = {f"{row.name}, {row.kv_cache_memory_bytes >> 20} MiB": profile_row(config, row) for row in rows(config)}
        text = profile_table(shares)
        (config.profile / "profile.md").write_text(text + "\n")
        print("\n" + text + f"\n\nwritten: {config.profile}")
        return 0
    # round-robin, so that a slow spell of the machine hits every configuration alike
    results = [run_row(config, row, repeat) for repeat in range(config.repeats) for row in rows(config)]
    print("\n" + table(results))
    config.out.mkdir(parents=True, exist_ok=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(config).items()}
    (config.out / "results.json").write_text(json.dumps({"settings": settings, "results": results}, indent=2) + "\n")
    (config.out / "table.md").write_text(table(results) + "\n")
    print(f"\nwritten: {config.out / 'results.json'}, {config.out / 'table.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
