"""The results tables of a bundled oracle: pruning methods at 50% sparsity (--table pruning), per-layer
KV-cache bits (--table kv) and the ablation of the activation-aware metrics' accuracy loss (--table
ablation), on shapes-llava or smol-llava (--model).

Runs every row through the product's own commands (`adaspkv prune` / `adaspkv search`, then
`adaspkv eval --artifact`), one after the other on this machine, and writes
results/<model>/<table>/<row>.json and results/<model>/<table>.md. Rows whose JSON exists are not re-run
(delete it to redo one). Searches compared with a uniform plan run once per seed (--seeds); the table
gives each seed and their mean and spread.

    .venv/bin/python scripts/results_table.py --model smol-llava --table pruning [--trials 50] [--seeds 0,1,2]
    .venv/bin/python scripts/results_table.py --model shapes-llava --table kv [--trials 50] [--seeds 0]
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from offline_search.data.bundled_models import resolve_model
from vllm_adaspkv.format import KVQuantScheme, read_geometry

REPO = Path(__file__).resolve().parent.parent
ADASPKV = str(Path(sys.executable).with_name("adaspkv"))

# What each oracle is evaluated on, and the window length every step shares. shapes-llava: its whole
# context (256) on the whole test split. smol-llava (context 8192): windows of 512 tokens, the first 64 of
# the test split (10% of it, 70 s a row; a window of 8192 over the whole split takes an hour a row here),
# with the standard error in the table, and 500 ShapesVQA questions (60 s); calibration 32 windows of 512
# + 32 conversations; objective 16 windows.
SETTINGS = {
    "shapes-llava": {"eval": ["--batch-size", "32"], "compress": [],
                     "protocol": "WikiText-2 test perplexity (1604 windows x 256 tokens, the pruning papers' protocol)"},
    "smol-llava": {"eval": ["--batch-size", "8", "--seq-len", "512", "--limit", "64", "--questions", "500"],
                   "compress": ["--seq-len", "512", "--objective-windows", "16"],
                   "protocol": "WikiText-2 test perplexity (the first 64 windows x 512 tokens of the test split, "
                               "+- its standard error over windows)"},
}
TITLES = {
    "pruning": "{model}, 50% sparsity of the language-model linears",
    "kv": "{model}, per-layer KV-cache bits (simulated with the serving quantizer, group 32 unless a row says otherwise)",
    "ablation": "{model}, 50% uniform: what costs the activation-aware metrics ShapesVQA accuracy",
}
PPL_DIGITS = {"pruning": 2, "kv": 4, "ablation": 2}  # KV plans differ in the third decimal of perplexity


def kv_rows(model: str, trials: int, seeds: list[int]) -> list[tuple[str, str, list[str] | None]]:
    head_dim = read_geometry(resolve_model(model)).head_dim
    kv_only = ["--model", model, "--sparsity", "0", "--allocation", "uniform"]
    # KV-only searches score plans by KL to the 16-bit model: mean-6-bit plans differ by 0.01% in
    # perplexity, below the noise of 64 validation windows (results/shapes-llava/README.md)
    kv_search = ["search", *kv_only, "--objective", "kl"]
    table = [("dense", "16-bit (dense)", None)]
    table += [(f"uniform{b}", f"uniform {b}-bit", ["prune", *kv_only, "--kv-bits", str(b)]) for b in (8, 6, 4, 2)]
    table += [(f"uniform{b}-hadamard", f"uniform {b}-bit, Hadamard-rotated keys",
               ["prune", *kv_only, "--kv-bits", str(b), "--kv-key-rotation", "hadamard"]) for b in (4, 2)]
    # One scale pair per head (group = head_dim) instead of per 32 values: 0.25-0.5 bit less a value.
    table += [(f"uniform{b}-g{head_dim}", f"uniform {b}-bit, group {head_dim} (one scale pair per head)",
               ["prune", *kv_only, "--kv-bits", str(b), "--kv-group", str(head_dim)]) for b in (8, 6, 4)]
    table += [("uniform8-fp8", "uniform 8-bit as float8 e4m3 values (vLLM's fp8 cache, no scales)",
               ["prune", *kv_only, "--kv-bits", "8", "--kv-eight-bit", "fp8_e4m3"])]
    table += [(f"uniform4-hadamard-g{head_dim}", f"uniform 4-bit, Hadamard-rotated keys, group {head_dim}",
               ["prune", *kv_only, "--kv-bits", "4", "--kv-key-rotation", "hadamard", "--kv-group", str(head_dim)])]
    for b in (6, 4.5):
        table += seeded(f"search{str(b).replace('.', '_')}", f"searched, mean <= {b} bits, KL objective ({trials} trials)",
                        [*kv_search, "--kv-bits-budget", str(b), "--trials", str(trials)], seeds)
    table += seeded("split", f"searched, the paper's half 8 / half 6, KL objective ({trials} trials)",
                    [*kv_search, "--kv-search", "split", "--trials", str(trials)], seeds[:1])
    joint = ["search", "--model", model, "--sparsity", "0.5", "--metric", "lognorm"]
    table += seeded("lognorm-tpe", f"50% lognorm, TPE, 16-bit KV ({trials} trials)", [*joint, "--trials", str(trials)],
                    seeds[:1])
    table += seeded("joint-s50-kv7", f"50% lognorm + KV mean <= 7 bits, joint TPE ({trials} trials)",
                    [*joint, "--kv-bits-budget", "7", "--trials", str(trials)], seeds[:1])
    return table


def pruning_rows(model: str, trials: int, seeds: list[int]) -> list[tuple[str, str, list[str] | None]]:
    """(row id, label, compress arguments or None for the dense model)."""
    prune = ["prune", "--model", model, "--sparsity", "0.5"]
    table = [("dense", "dense", None)]
    for metric in ("magnitude", "wanda", "sparsegpt", "lognorm"):
        table.append((f"{metric}-uniform", f"{metric}, uniform", [*prune, "--metric", metric]))
    table += [
        ("wanda-owl", "Wanda, OWL", [*prune, "--metric", "wanda", "--allocation", "owl"]),
        ("wanda-das-amia", "Wanda + AMIA, DAS (TAMP)",
         [*prune, "--metric", "wanda", "--allocation", "das", "--amia"]),
    ]
    table += seeded("lognorm-tpe", f"lognorm, TPE ({trials} trials, 8 blocks)",
                    ["search", "--model", model, "--sparsity", "0.5", "--metric", "lognorm", "--trials", str(trials)],
                    seeds)
    for metric in ("magnitude", "wanda", "sparsegpt", "lognorm"):
        table.append((f"{metric}-2of4", f"{metric}, 2:4", [*prune, "--metric", metric, "--nm", "2:4"]))
    return table


def ablation_rows(model: str, trials: int, seeds: list[int]) -> list[tuple[str, str, list[str] | None]]:
    """Why the activation-aware metrics lose ShapesVQA accuracy: each row changes one thing of a uniform
    50% Wanda / lognorm prune (the calibration mix, the group weights compete in, AMIA), with magnitude
    compared per row as well as per matrix (its default)."""
    prune = ["prune", "--model", model, "--sparsity", "0.5"]
    table = [("dense", "dense", None),
             ("magnitude-uniform", "magnitude (weights compete per matrix)", [*prune, "--metric", "magnitude"]),
             ("magnitude-row", "magnitude, per row", [*prune, "--metric", "magnitude", "--comparison", "row"])]
    for metric in ("wanda", "lognorm"):
        table += [
            (f"{metric}-uniform", f"{metric} (text + image calibration, per row)", [*prune, "--metric", metric]),
            (f"{metric}-images-only", f"{metric}, image conversations only",
             [*prune, "--metric", metric, "--calibration-text", "none"]),
            (f"{metric}-text-only", f"{metric}, text only", [*prune, "--metric", metric, "--calibration-images", "none"]),
            (f"{metric}-matrix", f"{metric}, per matrix", [*prune, "--metric", metric, "--comparison", "matrix"]),
            (f"{metric}-amia", f"{metric} + AMIA", [*prune, "--metric", metric, "--amia"]),
        ]
    return table


def seeded(row: str, label: str, command: list[str], seeds: list[int]) -> list[tuple[str, str, list[str]]]:
    """One row per seed; seed 0 keeps the plain row id (the rows measured before seeds were added)."""
    return [(row if seed == 0 else f"{row}-seed{seed}", f"{label}, seed {seed}", [*command, "--seed", str(seed)])
            for seed in seeds]


def run(command: list[str], log) -> float:
    log.write(f"$ {shlex.join(command)}\n")
    log.flush()
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=SETTINGS, default="shapes-llava")
    parser.add_argument("--table", choices=TITLES, required=True)
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--seeds", default="0", help="comma-separated seeds of the searches (default: %(default)s)")
    parser.add_argument("--rows", default=None, help="only these row ids, comma-separated (default: all)")
    parser.add_argument("--workdir", type=Path, default=None, help="default: runs/<model>-<table>-table")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    args.workdir = args.workdir or REPO / "runs" / f"{args.model}-{args.table}-table"
    settings = SETTINGS[args.model]
    table = {"pruning": pruning_rows, "kv": kv_rows, "ablation": ablation_rows}[args.table](args.model, args.trials, seeds)
    out = REPO / "results" / args.model / args.table
    out.mkdir(parents=True, exist_ok=True)
    args.workdir.mkdir(parents=True, exist_ok=True)
    wanted = set(args.rows.split(",")) if args.rows else None
    commands = []
    with open(args.workdir / "log.txt", "a") as log:
        for row, label, compress in table:
            result = out / f"{row}.json"
            evaluate = ["eval", "--model", args.model, *settings["eval"], "--json", str(result.relative_to(REPO))]
            if compress:
                artifact = args.workdir / row
                compress = [*compress, *settings["compress"], "--out", str(artifact.relative_to(REPO))]
                evaluate += ["--artifact", str(artifact.relative_to(REPO))]
            commands += [shlex.join(["adaspkv", *c]) for c in (compress, evaluate) if c]
            if result.is_file() or (wanted is not None and row not in wanted):
                continue
            seconds = run([ADASPKV, *compress], log) if compress else 0.0
            run([ADASPKV, *evaluate], log)
            data = json.loads(result.read_text())
            data["compress_seconds"] = seconds
            if compress:
                data["plan"] = json.loads((artifact / "adaspkv.json").read_text())
            result.write_text(json.dumps(data, indent=1))
            print(f"{row}: ppl {data['wikitext2_ppl']:.4f}, acc {data['shapesvqa_accuracy']:.3f} ({seconds:.0f} s)",
                  flush=True)
    write_table(TITLES[args.table].format(model=args.model), settings["protocol"], table, out, commands,
                PPL_DIGITS[args.table], args)
    return 0


def settings_questions(model: str) -> int:
    arguments = SETTINGS[model]["eval"]
    return int(arguments[arguments.index("--questions") + 1]) if "--questions" in arguments else 1000


def write_table(title: str, protocol: str, table, out: Path, commands: list[str], ppl_digits: int, args) -> None:
    command = f"scripts/results_table.py --model {args.model} --table {args.table} --trials {args.trials} --seeds {args.seeds}"
    lines = [f"# {title}", "",
             f"{protocol} and ShapesVQA test accuracy ({settings_questions(args.model)} questions), offline through "
             f"transformers. Produced by "
             f"`.venv/bin/python {command}` on a 2-core CPU machine.", "",
             "| method | WikiText-2 ppl | ShapesVQA acc | mean sparsity | KV bits per layer | KV bytes per token "
             "| time to compress |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    geometry = read_geometry(resolve_model(args.model))
    groups: dict[str, list[dict]] = {}
    for row, label, _ in table:
        path = out / f"{row}.json"
        if not path.is_file():
            lines.append(f"| {label} | not run | | | | | |")
            continue
        data = json.loads(path.read_text())
        if ", seed " in label:
            groups.setdefault(label.rsplit(", seed ", 1)[0], []).append(data)
        sparsity = data["plan"]["evaluation"]["mean_sparsity"] if "plan" in data else ""
        sparsity = f"{sparsity:.4f}" if sparsity != "" else ("0" if row == "dense" else "")
        bits = [layer["kv_bits"] for layer in data["plan"]["layers"]] if "plan" in data else []
        # K and V of every layer and KV head, scales included; 16-bit layers at 2 bytes a value. Only the
        # KV scheme is read: older results' plans predate fields that Plan now requires.
        scheme = KVQuantScheme.model_validate(data["plan"].get("kv_quant", {})) if "plan" in data else KVQuantScheme()
        token_bytes = scheme.bytes_per_token(bits or [16] * geometry.num_layers, geometry.num_kv_heads,
                                             geometry.head_dim)
        bits = "/".join(map(str, bits)) or "16"
        se = f" +- {data['wikitext2_ppl_se']:.{ppl_digits}f}" if "wikitext2_ppl_se" in data else ""
        lines.append(f"| {label} | {data['wikitext2_ppl']:.{ppl_digits}f}{se} | {data['shapesvqa_accuracy']:.3f} | "
                     f"{sparsity} | {bits} | {token_bytes} | {data.get('compress_seconds', 0):.0f} s |")
    for label, runs in groups.items():
        if len(runs) < 2:
            continue
        ppl = [r["wikitext2_ppl"] for r in runs]
        acc = [r["shapesvqa_accuracy"] for r in runs]
        lines.append(f"| {label}: mean of {len(runs)} seeds (min-max) | {statistics.mean(ppl):.{ppl_digits}f} "
                     f"({min(ppl):.{ppl_digits}f}-{max(ppl):.{ppl_digits}f}) | {statistics.mean(acc):.3f} "
                     f"({min(acc):.3f}-{max(acc):.3f}) | | | | |")
    lines += ["", "Commands (run from the repository root, `adaspkv` = `.venv/bin/adaspkv`):", "", "```"]
    lines += commands + ["```", ""]
    (out.parent / f"{out.name}.md").write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
