"""Starts `vllm serve` on a model, evaluates it through the OpenAI API, stops the server.

    .venv/bin/python scripts/eval_through_vllm.py --model shapes-llava --json served.json \\
        [--artifact ART_DIR] [--limit N] [-- extra vllm serve arguments]

With --artifact the server runs `vllm serve ART_DIR --plugin adaspkv` (masked weights, per-layer
quantized KV cache); --model is then the artifact's base model, whose tokenizer the evaluation uses.

The same as `adaspkv eval --server URL` against a server you started yourself; by default the
server runs in float32 (as the offline evaluation does) with a 64 MiB KV cache, and with a context
one token longer than the model's, because a request for prompt log-probs (perplexity) over a
full-length window must also generate one token.
"""

import argparse
import sys
import tempfile
from pathlib import Path

from offline_search.data.bundled_models import resolve_model
from offline_search.evaluation.harness import TASKS, EvalConfig, evaluate
from offline_search.evaluation.results import format_table, write_results
from offline_search.evaluation.vllm_server import ServerConfig, VllmServer
from vllm_adaspkv.format import read_geometry

if __name__ == "__main__":
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--json", type=Path, required=True, dest="json_out")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--artifact", type=Path, default=None)
    args = parser.parse_args(argv)
    model_dir = resolve_model(args.model)
    context = read_geometry(model_dir).max_position_embeddings
    serve_args = tuple(extra) or ("--dtype", "float32", "--kv-cache-memory-bytes", str(64 << 20),
                                  "--max-model-len", str(context + 1))
    with tempfile.TemporaryDirectory() as tmp:
        served = args.artifact or model_dir
        plugin = ("--plugin", "adaspkv") if args.artifact else ()
        config = ServerConfig(model=str(served), log_file=Path(tmp) / "vllm-serve.log",
                              extra_args=(*serve_args, *plugin), env={"VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1"})
        with VllmServer(config) as server:
            eval_config = EvalConfig(model=args.model, tasks=tuple(args.tasks.split(",")),
                                     limit=args.limit, server=server.base_url)
            results = evaluate(eval_config, model_dir)
    results["vllm_serve_args"] = [str(served), *serve_args, *plugin]
    print(format_table(results))
    write_results(results, eval_config, args.json_out)
