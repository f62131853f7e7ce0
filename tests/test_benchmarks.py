"""The GPU benchmark scripts, without a GPU: their dry runs and their refusal to run without CUDA.

benchmarks/decode_step.py --dry-run runs in a fresh process: it sets TRITON_INTERPRET=1 before
importing triton, which only works in a process that has not imported it yet.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vllm_adaspkv.kv import quant

REPO = Path(__file__).resolve().parent.parent
DECODE_STEP = REPO / "benchmarks" / "decode_step.py"
# one plan of each kind: torch baseline, the kernels' 16-bit format, a uniform width, a mixed plan
PLANS = ["sdpa-bf16", "bf16", "6", "mixed:8/4"]


def run_script(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(DECODE_STEP), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def test_decode_step_dry_run_checks_kernels_and_sizes_batches_by_the_budget(tmp_path):
    out = tmp_path / "decode_step.json"
    run = run_script("--dry-run", "--plans", ",".join(PLANS), "--json", str(out))
    assert run.returncode == 0, f"{run.stdout[-4000:]}\n{run.stderr[-4000:]}"
    assert "dry run: no timings are meaningful" in run.stdout
    result = json.loads(out.read_text())
    cfg, rows = result["config"], result["rows"]
    assert [r["plan"] for r in rows] == PLANS

    # the capacity formula, from the quantizer's row size: whole blocks of every layer, whole blocks
    # per request of context + warm-up + timed steps + the checked step
    bits = {"sdpa-bf16": [16, 16], "bf16": [16, 16], "6": [6, 6], "mixed:8/4": [8, 4]}  # 2 layers
    per_request = -(-(cfg["context"] + cfg["warmup"] + cfg["steps"] + 1) // cfg["block_size"])
    for r in rows:
        assert r["bits"] == bits[r["plan"]]
        token_bytes = sum(2 * cfg["kv_heads"] * quant.bytes_per_token_head(b, cfg["head_dim"], cfg["group"])
                          for b in r["bits"])
        blocks = cfg["kv_budget_bytes"] // (cfg["block_size"] * token_bytes)
        assert (r["bytes_per_token"], r["num_blocks"], r["blocks_per_request"], r["max_batch"]) == \
            (token_bytes, blocks, per_request, blocks // per_request), r["plan"]
        assert r["batch"] == min(r["max_batch"], cfg["max_batch"]) >= 1
        assert r["step_ms"] > 0 and r["tokens_per_s"] > 0
        if r["plan"] != "sdpa-bf16":  # kernels against kv.paged, call by call, in the first step
            assert r["check_ok"] and r["check_write_bad_rows"] == 0, r
    by_plan = {r["plan"]: r for r in rows}
    assert by_plan["sdpa-bf16"]["batch"] == by_plan["bf16"]["batch"] < by_plan["6"]["batch"]
    assert by_plan["6"]["batch"] == by_plan["mixed:8/4"]["batch"]  # the same mean bytes per token
    assert result["cross_check"]["ok"], result["cross_check"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the message on a machine without CUDA")
def test_decode_step_without_cuda_exits_2():
    run = run_script("--steps", "1")
    assert run.returncode == 2 and "no CUDA GPU" in run.stderr


def load_benchmark(monkeypatch, name: str):
    """benchmarks/<name>.py as a module (the folder is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_cpu_throughput_table_takes_medians_over_repeats(monkeypatch):
    bench = load_benchmark(monkeypatch, "cpu_throughput")

    def runs(name, tokens, values):
        return [{"kv_cache_memory_bytes": 1 << 20, "name": name, "kv_cache_tokens": tokens,
                 "requests_per_second": v, "output_tokens_per_second": 128 * v} for v in values]

    lines = bench.table(runs("stock", 512, [4, 6, 5]) + runs("plugin 4-bit", 1792, [7, 6, 8])).splitlines()
    assert lines[2] == "| 1 MiB | stock | 512 | 5.000 (4.00-6.00) | 640.0 | 1.00x |"
    assert lines[3] == "| 1 MiB | plugin 4-bit | 1,792 | 7.000 (6.00-8.00) | 896.0 | 1.40x |"  # 7 / 5
    with pytest.raises(ValueError, match="--repeats 0: must be >= 1"):
        bench.BenchConfig(repeats=0)


# The head of a worker's table as vLLM's torch profiler writes it (self CPU time, CPU-only run).
PROFILER_TABLE = """\
-----------------------------------------------------  ------------  ------------  ------------
                                                 Name    Self CPU %      Self CPU   CPU total %
-----------------------------------------------------  ------------  ------------  ------------
                            adaspkv_kv::attend_decode        36.08%        8.898s        36.26%
                                        _C::onednn_mm        33.55%        8.274s        33.75%
               execute_context_0(0)_generation_32(32)        10.32%        2.544s        84.07%
-----------------------------------------------------  ------------  ------------  ------------
Self CPU time total: 24.659s
"""


def test_cpu_throughput_profile_reads_the_workers_table(monkeypatch):
    bench = load_benchmark(monkeypatch, "cpu_throughput")
    shares = bench.read_profile(PROFILER_TABLE)
    assert shares == {"adaspkv_kv::attend_decode": 36.08, "_C::onednn_mm": 33.55,
                      "execute_context_0(0)_generation_32(32)": 10.32, bench.TOTAL: 24.659}
    assert bench.read_profile("Self CPU time total: 812.5ms\n") == {bench.TOTAL: 0.8125}
    stock = {"_C::onednn_mm": 47.8, bench.TOTAL: 30.0}
    lines = bench.profile_table({"plugin 6-bit": shares, "stock": stock}, top=2).splitlines()
    assert lines[2:] == [f"| {bench.TOTAL} | 24.66 | 30.00 |",
                         "| `adaspkv_kv::attend_decode` | 36.1 % | 0.0 % |",
                         "| `_C::onednn_mm` | 33.5 % | 47.8 % |"]
    flags = bench.profiler_flags(Path("/tmp/traces"))
    assert flags[:2] == ("--profile", "--profiler-config")
    assert json.loads(flags[2])["torch_profiler_dir"] == "/tmp/traces"


def test_cpu_throughput_run_keeps_the_log_and_stops_with_its_tail(monkeypatch, tmp_path):
    bench = load_benchmark(monkeypatch, "cpu_throughput")
    log = tmp_path / "ok.log"
    assert bench.run_bench(["echo", "KV cache size: 896 tokens"], log, "stock") == "KV cache size: 896 tokens\n"
    assert log.read_text() == "KV cache size: 896 tokens\n"
    failing = ["sh", "-c", "echo first; echo 'the last line'; exit 3"]
    with pytest.raises(SystemExit, match=r"plugin 4-bit: `vllm bench throughput` failed \(exit 3\), log .*bad\.log:\n"
                                         r"first\nthe last line"):
        bench.run_bench(failing, tmp_path / "bad.log", "plugin 4-bit")


def test_kernel_decode_attention_cpu_runs_every_format(tmp_path):
    out = tmp_path / "kernel.json"
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "kernel_decode_attention_cpu.py"), "--batch", "2",
                          "--context", "20", "--iters", "2", "--repeats", "1", "--json", str(out)],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["format"] for r in rows] == ["16", "8", "fp8", "6", "4", "2"]
    assert [r["row_bytes"] for r in rows] == [128, 72, 64, 56, 40, 24]  # head_dim 64, group 32
    assert all(r["us_per_call"] > 0 for r in rows)
