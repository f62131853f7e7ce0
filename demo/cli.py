"""Image chat with a compressed LLaVA in the browser: `adaspkv demo`.

With no arguments: the bundled shapes-llava and its compressed artifact (searched in a few trials on
the first run, then reused), served by `vllm serve ART_DIR --plugin adaspkv`, and a Gradio app on
http://127.0.0.1:7860 with example ShapesVQA images, streamed answers, the artifact's per-layer
sparsity and KV bits, its KV capacity against a 16-bit cache and the speed of each answer. Ctrl-C
stops the app and every server it started.

  adaspkv demo --model DIR --artifact ART_DIR     any LLaVA (llava-hf layout), any artifact
  adaspkv demo --server-url http://HOST:8000      an already running server (nothing is started)
  adaspkv demo --compare-dense                    side-by-side answers of the dense model
  adaspkv demo --once                             one ShapesVQA question in the terminal, no browser
"""

from __future__ import annotations

import argparse
from pathlib import Path

from demo.launch import ASSETS, DemoConfig
from offline_search.cli.extras import require_extra

HELP = "image chat in the browser with a compressed LLaVA served by vllm serve --plugin adaspkv"


def _default(name: str):
    return DemoConfig.model_fields[name].default


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    what = parser.add_argument_group("what to serve")
    what.add_argument("--model", default=_default("model"),
                      help="bundled model name or LLaVA checkpoint directory in the llava-hf layout; with "
                           "an --artifact directory its adaspkv.json names the model (default: %(default)s)")
    what.add_argument("--artifact", default=_default("artifact"),
                      help="compressed artifact directory (from `adaspkv search` or `prune`), served with "
                           "`vllm serve ART_DIR --plugin adaspkv`; 'auto': the model's own one in "
                           "WORKDIR/artifacts/, searched on first use (--search-trials; about a minute for "
                           "shapes-llava, long for a real LLaVA); 'none': serve the model uncompressed "
                           "(default: %(default)s)")
    what.add_argument("--server-url", default=None,
                      help="chat with this running OpenAI-compatible server instead of starting one, e.g. "
                           "http://127.0.0.1:8000 (--artifact then only feeds the profile panel)")
    what.add_argument("--compare-dense", action="store_true",
                      help="also start the dense base model (stock `vllm serve`) and offer side-by-side answers")
    what.add_argument("--dense-server-url", default=None,
                      help="with --compare-dense: a running server of the dense model instead of starting one")
    what.add_argument("--search-trials", type=int, default=_default("search_trials"),
                      help="trials of the first-run search for --artifact auto (default: %(default)s)")

    serve = parser.add_argument_group("vLLM server")
    serve.add_argument("--dtype", default=None,
                       help="--dtype for `vllm serve` (default: the dtype the checkpoint is stored in, float32 for "
                            "the bundled models, whose scores were measured in float32)")
    serve.add_argument("--kv-cache-memory-bytes", type=int, default=_default("kv_cache_memory_bytes"),
                       help="KV-cache size handed to vLLM (default: %(default)s)")

    app = parser.add_argument_group("app")
    app.add_argument("--host", default=_default("host"), help="address of the Gradio app (default: %(default)s)")
    app.add_argument("--port", type=int, default=_default("port"),
                     help="port of the Gradio app; 0 picks a free one (default: %(default)s)")
    app.add_argument("--max-tokens", type=int, default=_default("max_tokens"),
                     help="answer length limit (default: %(default)s)")
    app.add_argument("--history-turns", type=int, default=_default("history_turns"),
                     help="earlier question/answer pairs about the same image sent with each question; "
                          "shapes-llava was trained on single questions (default: %(default)s)")
    app.add_argument("--workdir", type=Path, default=_default("workdir"),
                     help="artifacts, example images and server logs (default: %(default)s)")

    once = parser.add_argument_group("one question in the terminal (no browser)")
    once.add_argument("--once", action="store_true",
                      help="start the server(s), ask one question, print the answer and stop")
    once.add_argument("--image", type=Path, default=None,
                      help=f"with --once: image to ask about (default: a ShapesVQA test image); photos are in "
                           f"{ASSETS / 'images'}")
    once.add_argument("--question", default=None,
                      help="with --once: question to ask (default: the ShapesVQA sample's question)")
    once.add_argument("--shapes-index", type=int, default=_default("shapes_index"),
                      help="with --once and no --image: which ShapesVQA test sample (default: %(default)s)")


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    return DemoConfig(model=args.model, artifact=args.artifact, server_url=args.server_url,
                      dense_server_url=args.dense_server_url, compare_dense=args.compare_dense, host=args.host,
                      port=args.port, workdir=args.workdir, max_tokens=args.max_tokens,
                      history_turns=args.history_turns, dtype=args.dtype,
                      kv_cache_memory_bytes=args.kv_cache_memory_bytes, search_trials=args.search_trials,
                      once=args.once, image=args.image, question=args.question, shapes_index=args.shapes_index)


def run(args: argparse.Namespace) -> int:
    require_extra("demo", "gradio", "optuna", "matplotlib")  # the first run searches an artifact
    from demo.launch import run_app, run_once, stop_signals

    config = config_from_args(args)  # bad options, a missing server or search: AdaspkvError, one line
    try:
        with stop_signals():  # Ctrl-C and SIGTERM unwind: every server started is stopped
            return run_once(config) if config.once else run_app(config)
    except KeyboardInterrupt:
        print("\nadaspkv demo: stopped", flush=True)
        return 130
