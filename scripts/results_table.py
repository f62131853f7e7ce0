"""The results tables on shapes-llava: pruning methods at 50% sparsity (--table pruning) and
per-layer KV-cache bits (--table kv).

Runs every row through the product's own commands (`adaspkv prune` / `adaspkv search`, then
`adaspkv eval --artifact`), one after the other on this machine, and writes
results/shapes-llava/<table>/<row>.json and results/shapes-llava/<table>.md. Rows whose JSON
exists are not re-run (delete it to redo one).

    .venv/bin/python scripts/results_table.py --table pruning [--trials 50] [--seed 0]
    .venv/bin/python scripts/results_table.py --table kv [--trials 50] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ADASPKV = str(Path(sys.executable).with_name("adaspkv"))
RESULTS = REPO / "results" / "shapes-llava"


TITLES = {
    "pruning": "shapes-llava, 50% sparsity of the language-model linears",
    "kv": "shapes-llava, per-layer KV-cache bits (simulated with the serving quantizer, group 32)",
}

PPL_DIGITS = {"pruning": 2, "kv": 4}  # KV plans differ in the third decimal of perplexity


def kv_rows(trials: int, seed: int) -> list[tuple[str, str, list[str] | None]]:
    kv_only = ["--model", "shapes-llava", "--sparsity", "0", "--allocation", "uniform", "--seed", str(seed)]
    # KV-only searches score plans by KL to the 16-bit model: mean-6-bit plans differ by 0.01% in
    # perplexity, below the noise of 64 validation windows (results/shapes-llava/README.md)
    kv_search = ["search", *kv_only, "--objective", "kl"]
    table = [("dense", "16-bit (dense)", None)]
    table += [(f"uniform{b}", f"uniform {b}-bit", ["prune", *kv_only, "--kv-bits", str(b)]) for b in (8, 6, 4, 2)]
    table += [(f"uniform{b}-hadamard", f"uniform {b}-bit, Hadamard-rotated keys",
               ["prune", *kv_only, "--kv-bits", str(b), "--kv-key-rotation", "hadamard"]) for b in (4, 2)]
    table += [(f"search{str(b).replace('.', '_')}", f"searched, mean <= {b} bits, KL objective ({trials} trials)",
               [*kv_search, "--kv-bits-budget", str(b), "--trials", str(trials)]) for b in (6, 4.5)]
    table += [("split", f"searched, the paper's half 8 / half 6, KL objective ({trials} trials)",
               [*kv_search, "--kv-search", "split", "--trials", str(trials)])]
    joint = ["search", "--model", "shapes-llava", "--sparsity", "0.5", "--metric", "lognorm", "--seed", str(seed)]
    table += [("lognorm-tpe", f"50% lognorm, TPE, 16-bit KV ({trials} trials)", [*joint, "--trials", str(trials)]),
              ("joint-s50-kv7", f"50% lognorm + KV mean <= 7 bits, joint TPE ({trials} trials)",
               [*joint, "--kv-bits-budget", "7", "--trials", str(trials)])]
    return table


def pruning_rows(trials: int, seed: int) -> list[tuple[str, str, list[str] | None]]:
    """(row id, label, compress arguments or None for the dense model)."""
    prune = ["prune", "--model", "shapes-llava", "--sparsity", "0.5", "--seed", str(seed)]
    table = [("dense", "dense", None)]
    for metric in ("magnitude", "wanda", "sparsegpt", "lognorm"):
        table.append((f"{metric}-uniform", f"{metric}, uniform", [*prune, "--metric", metric]))
    table += [
        ("wanda-owl", "Wanda, OWL", [*prune, "--metric", "wanda", "--allocation", "owl"]),
        ("wanda-das-amia", "Wanda + AMIA, DAS (TAMP)",
         [*prune, "--metric", "wanda", "--allocation", "das", "--amia"]),
        ("lognorm-tpe", f"lognorm, TPE ({trials} trials, 8 blocks)",
         ["search", "--model", "shapes-llava", "--sparsity", "0.5", "--metric", "lognorm",
          "--trials", str(trials), "--seed", str(seed)]),
    ]
    for metric in ("magnitude", "wanda", "sparsegpt", "lognorm"):
        table.append((f"{metric}-2of4", f"{metric}, 2:4", [*prune, "--metric", metric, "--nm", "2:4"]))
    return table


def run(command: list[str], log) -> float:
    log.write(f"$ {shlex.join(command)}\n")
    log.flush()
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--table", choices=TITLES, required=True)
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None, help="default: runs/<table>-table")
    args = parser.parse_args()
    args.workdir = args.workdir or REPO / "runs" / f"{args.table}-table"
    rows = {"pruning": pruning_rows, "kv": kv_rows}[args.table]
    out = RESULTS / args.table
    out.mkdir(parents=True, exist_ok=True)
    args.workdir.mkdir(parents=True, exist_ok=True)
    commands = []
    with open(args.workdir / "log.txt", "a") as log:
        for row, label, compress in rows(args.trials, args.seed):
            result = out / f"{row}.json"
            evaluate = ["eval", "--model", "shapes-llava", "--batch-size", "32", "--json", str(result.relative_to(REPO))]
            if compress:
                artifact = args.workdir / row
                compress = [*compress, "--out", str(artifact.relative_to(REPO))]
                evaluate += ["--artifact", str(artifact.relative_to(REPO))]
            commands += [shlex.join(["adaspkv", *c]) for c in (compress, evaluate) if c]
            if result.is_file():
                print(f"{row}: kept {result.name}")
                continue
            seconds = run([ADASPKV, *compress], log) if compress else 0.0
            run([ADASPKV, *evaluate], log)
            data = json.loads(result.read_text())
            data["compress_seconds"] = seconds
            if compress:
                data["plan"] = json.loads((artifact / "adaspkv.json").read_text())
            result.write_text(json.dumps(data, indent=1))
            print(f"{row}: ppl {data['wikitext2_ppl']:.4f}, acc {data['shapesvqa_accuracy']:.3f} ({seconds:.0f} s)")
    write_table(TITLES[args.table], rows(args.trials, args.seed), out, commands, PPL_DIGITS[args.table])
    return 0


def write_table(title: str, table, out: Path, commands: list[str], ppl_digits: int) -> None:
    lines = [f"# {title}", "",
             "WikiText-2 test perplexity (1604 windows x 256 tokens, the pruning papers' protocol) and "
             "ShapesVQA test accuracy (1000 questions), offline through transformers. Produced by "
             f"`.venv/bin/python scripts/results_table.py --table {out.name}` on a 2-core CPU machine.", "",
             "| method | WikiText-2 ppl | ShapesVQA acc | mean sparsity | KV bits per layer | time to compress |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row, label, _ in table:
        path = out / f"{row}.json"
        if not path.is_file():
            lines.append(f"| {label} | not run | | | | |")
            continue
        data = json.loads(path.read_text())
        sparsity = data["plan"]["evaluation"]["mean_sparsity"] if "plan" in data else ""
        sparsity = f"{sparsity:.4f}" if sparsity != "" else ("0" if row == "dense" else "")
        bits = [layer["kv_bits"] for layer in data["plan"]["layers"]] if "plan" in data else []
        bits = "/".join(map(str, bits)) or "16"
        lines.append(f"| {label} | {data['wikitext2_ppl']:.{ppl_digits}f} | {data['shapesvqa_accuracy']:.3f} | "
                     f"{sparsity} | {bits} | {data.get('compress_seconds', 0):.0f} s |")
    lines += ["", "Commands (run from the repository root, `adaspkv` = `.venv/bin/adaspkv`):", "", "```"]
    lines += commands + ["```", ""]
    (out.parent / f"{out.name}.md").write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
