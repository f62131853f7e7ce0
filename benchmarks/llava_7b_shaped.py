"""LLaVA-1.5-7B-shaped, end to end on this machine: write the checkpoint, prune it three ways, search
it, serve it. Every stage runs as its own process (the commands a user types); its wall time and the
peak RSS of its process tree (psutil, sampled every 0.2 s: the server's engine core is a child) are
recorded in OUT/results.json with the exact commands. Random weights: shape, memory and time only.

    .venv/bin/python benchmarks/llava_7b_shaped.py --workdir /data/llava7b       # ~2 h on 2 cores
    .venv/bin/python benchmarks/llava_7b_shaped.py --workdir W --stages search,serve   # stages again

WORKDIR holds the 14 GB checkpoint, the artifacts (SparseGPT's is a full 14 GB checkpoint), and the
calibration cache (SparseGPT's Hessians: 22 GB). `--config` takes another config.json of the family
(a small one: a smoke run of every stage in minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
FIXTURE = REPO / "tests" / "fixtures" / "llava-1.5-7b-hf" / "config.json"
STAGES = ("write", "prune-magnitude", "prune-wanda", "prune-sparsegpt", "search", "serve")
PHOTO = REPO / "demo" / "assets" / "images" / "waterview.jpg"


def calibration_args(args) -> list[str]:
    """The issue's small calibration set: 8 windows of 512 tokens + 8 images; 2 objective windows."""
    return ["--calibration-windows", "8", "--calibration-samples", "8", "--seq-len", "512",
            "--objective-windows", "2", "--objective-samples", "2", "--cache-dir", str(args.workdir / "cache")]


def stage_command(stage: str, args) -> list[str]:
    model = str(args.workdir / "model")
    if stage == "write":
        return [sys.executable, str(REPO / "scripts" / "make_shaped_llava.py"), "--out", model,
                "--config", str(args.config)]
    if stage.startswith("prune-"):
        metric = stage.removeprefix("prune-")
        kv = ["--kv-bits", "4"] if metric == "magnitude" else []  # the served artifact: a 4-bit KV plan
        return [str(BIN / "adaspkv"), "prune", "--model", model, "--metric", metric, "--sparsity", "0.5",
                "--out", str(args.workdir / f"art-{metric}"), *kv, *calibration_args(args)]
    if stage == "search":
        return [str(BIN / "adaspkv"), "search", "--model", model, "--metric", "lognorm", "--sparsity", "0.5",
                "--trials", "3", "--out", str(args.workdir / "art-search"), *calibration_args(args)]
    raise ValueError(stage)


def tree_memory(root: psutil.Process, include_root: bool = True) -> tuple[int, int]:
    """(RSS, anonymous RSS) summed over a process (if include_root) and its descendants; processes that
    end while they are read are left out."""
    total = anon = 0
    for p in [root] * include_root + root.children(recursive=True):
        try:
            info = p.memory_info()
            total, anon = total + info.rss, anon + info.rss - info.shared  # shared: file-backed
        except psutil.Error:
            pass
    return total, anon


def tree_breakdown(root: psutil.Process) -> list[dict]:
    """Per process of the tree (root first): RSS, PSS (shared pages divided among the processes that map
    them, so the tree's PSS counts torch's libraries once, not once per process) and anonymous RSS, in MiB."""
    rows = []
    for p in [root, *root.children(recursive=True)]:
        try:
            info, full = p.memory_info(), p.memory_full_info()
            name = " ".join(p.cmdline()[:3])[-60:]
        except psutil.Error:
            continue
        rows.append({"pid": p.pid, "name": name, "rss_mib": info.rss / 2**20, "pss_mib": full.pss / 2**20,
                     "anon_mib": (info.rss - info.shared) / 2**20})
    return rows


class PeakRSS:
    """Peaks of the summed RSS, and of the summed anonymous part of it, of a process and all its
    descendants, sampled in a thread. RSS also counts the clean pages of memory-mapped files (vLLM and
    transformers map the checkpoint), which the kernel can drop at any time; anonymous memory is what
    the processes hold and what runs a machine out of memory."""

    def __init__(self, pid: int, interval_s: float = 0.2, include_root: bool = True):
        self.root, self.interval_s, self.peak, self.peak_anon = psutil.Process(pid), interval_s, 0, 0
        self.include_root = include_root
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                total, anon = tree_memory(self.root, self.include_root)
                self.peak, self.peak_anon = max(self.peak, total), max(self.peak_anon, anon)
            except psutil.Error:
                pass
            self._stop.wait(self.interval_s)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def run_stage(stage: str, args) -> dict:
    command = stage_command(stage, args)
    log = args.workdir / f"{stage}.log"
    print(f"[{stage}] $ {shlex.join(command)}", flush=True)
    start = time.monotonic()
    with open(log, "w") as f:
        process = subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
        rss = PeakRSS(process.pid)
        code = process.wait()
    peak = rss.stop()
    result = {"stage": stage, "command": command, "exit_code": code, "wall_s": round(time.monotonic() - start, 1),
              "peak_rss_gib": round(peak / 2**30, 2), "peak_anon_gib": round(rss.peak_anon / 2**30, 2),
              "log": str(log)}
    text = log.read_text(errors="replace")
    for line in text.splitlines():  # what the commands print about themselves
        if line.startswith(("dense model:", "compressed model:", "mean trial time", "written in", "artifact written")):
            result.setdefault("printed", []).append(line.strip())
    if code != 0:
        print("\n".join(text.splitlines()[-20:]))
    print(f"[{stage}] exit {code}, {result['wall_s']} s, peak RSS {result['peak_rss_gib']} GiB "
          f"(anonymous {result['peak_anon_gib']} GiB)", flush=True)
    return result


def serve_stage(args) -> dict:
    """`vllm serve ART --plugin adaspkv` of the magnitude artifact (50 %, 4-bit KV), one image chat."""
    import requests
    from openai import OpenAI

    from offline_search.evaluation.openai_chat import ask, image_data_url, image_message
    from offline_search.evaluation.vllm_server import ServerConfig, VllmServer

    artifact = str(args.workdir / "art-magnitude")
    # --kv-cache-memory-bytes: vLLM's CPU backend then skips its start-up check of free memory against
    # gpu_memory_utilization x the NUMA node's total, which a 14 GB model on a 24 GiB machine fails.
    extra = ("--plugin", "adaspkv", "--tokenizer", str(args.workdir / "model"), "--dtype", "bfloat16",
             "--kv-cache-memory-bytes", str(1 << 30), "--max-model-len", "2048", "--max-num-seqs", "4")
    config = ServerConfig(model=artifact, log_file=args.workdir / "serve.log", extra_args=extra,
                          startup_timeout_s=3600)
    server = VllmServer(config)
    command = server.command()
    print(f"[serve] $ {shlex.join(command)}", flush=True)
    start = time.monotonic()
    rss = PeakRSS(os.getpid(), include_root=False)  # the server and its engine: this script's children
    server.start()
    startup = time.monotonic() - start
    try:
        client = OpenAI(base_url=f"{server.base_url}/v1", api_key="none", timeout=1800)
        asked = time.monotonic()
        answer = ask(client, artifact, [image_message("What is in this picture?", image_data_url(PHOTO))], 16)
        chat_s = time.monotonic() - asked
        metrics = requests.get(f"{server.base_url}/metrics", timeout=10).text
    finally:
        peak = rss.stop()
        server.stop()
    prompt_tokens = [line for line in metrics.splitlines() if line.startswith("vllm:prompt_tokens_total")]
    log = config.log_file.read_text(errors="replace")
    table = [line.split("] ", 1)[-1] for line in log.splitlines() if "adaspkv" in line and "KV" in line]
    result = {"stage": "serve", "command": command, "exit_code": 0, "startup_s": round(startup, 1),
              "chat_s": round(chat_s, 1), "answer": answer, "prompt_tokens": prompt_tokens,
              "peak_rss_gib": round(peak / 2**30, 2), "peak_anon_gib": round(rss.peak_anon / 2**30, 2),
              "startup_table_lines": table[-3:],
              "log": str(config.log_file)}
    print(f"[serve] started in {startup:.0f} s, answered in {chat_s:.0f} s: {answer!r}; peak RSS "
          f"{result['peak_rss_gib']} GiB", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True, help="where the checkpoint and artifacts go")
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default: results/llava-7b-shaped, or WORKDIR with --config)")
    parser.add_argument("--config", type=Path, default=FIXTURE, help="config.json of the checkpoint to write")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma list from {','.join(STAGES)}")
    args = parser.parse_args(argv)
    stages = args.stages.split(",")
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        parser.error(f"--stages: unknown {unknown}; choose from {', '.join(STAGES)}")
    out = args.out or (REPO / "results" / "llava-7b-shaped" if args.config == FIXTURE else args.workdir)
    args.workdir.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {"stages": {}}
    results["machine"] = {"cpus": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
                          "platform": platform.platform(), "python": platform.python_version()}
    results["reproduce"] = f".venv/bin/python benchmarks/llava_7b_shaped.py --workdir WORKDIR --stages {args.stages}"
    for stage in stages:
        results["stages"][stage] = serve_stage(args) if stage == "serve" else run_stage(stage, args)
        results_file.write_text(json.dumps(results, indent=2) + "\n")  # after every stage: nothing lost
        if results["stages"][stage]["exit_code"] != 0:
            print(f"stopping: stage {stage} failed (log {results['stages'][stage]['log']})")
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
