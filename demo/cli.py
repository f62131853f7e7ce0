"""Serve a LLaVA with `vllm serve --plugin adaspkv` and ask it one question about an image.

Without --model, the test kit's tiny random LLaVA is built first (its answers are noise: it shows
that the whole path works, not what a trained model says). The Gradio image chat replaces this
terminal run in a later release.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
DEFAULT_IMAGE = ASSETS / "images" / "waterview.jpg"
SERVED_NAME = "adaspkv-demo"


@dataclass(frozen=True)
class DemoConfig:
    model: Path | None  # None: build the test kit's tiny random LLaVA under workdir
    image: Path
    question: str
    workdir: Path
    max_tokens: int = 24
    kv_cache_memory_bytes: int = 256 << 20
    startup_timeout_s: float = 900.0

    def __post_init__(self):
        if self.model is not None and not (self.model / "config.json").is_file():
            raise ValueError(f"--model {self.model}: no config.json there; give a LLaVA checkpoint directory")
        if not self.image.is_file():
            raise ValueError(f"--image {self.image}: no such file")
        if not self.question.strip():
            raise ValueError("--question is empty")
        if self.max_tokens < 1:
            raise ValueError(f"--max-tokens {self.max_tokens}: must be >= 1")
        if self.kv_cache_memory_bytes < 1 << 20:
            raise ValueError(f"--kv-cache-memory-bytes {self.kv_cache_memory_bytes}: must be >= 1 MiB")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=None,
                        help="LLaVA checkpoint directory (llava-hf layout); default: build the "
                             "test kit's tiny random LLaVA")
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE,
                        help="image to ask about (default: %(default)s)")
    parser.add_argument("--question", default="What is in the image?",
                        help="question to ask (default: %(default)r)")
    parser.add_argument("--max-tokens", type=int, default=DemoConfig.max_tokens,
                        help="answer length limit (default: %(default)s)")
    parser.add_argument("--kv-cache-memory-bytes", type=int, default=DemoConfig.kv_cache_memory_bytes,
                        help="KV-cache size handed to vLLM (default: %(default)s)")
    parser.add_argument("--workdir", type=Path, default=Path("runs/demo"),
                        help="where the built model and the server log go (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    try:
        config = DemoConfig(model=args.model, image=args.image, question=args.question,
                            workdir=args.workdir, max_tokens=args.max_tokens,
                            kv_cache_memory_bytes=args.kv_cache_memory_bytes)
    except ValueError as exc:
        raise SystemExit(f"adaspkv demo: {exc}") from None
    answer = ask_once(config)
    print(f"Q: {config.question}\nA: {answer}")
    return 0


def ask_once(config: DemoConfig) -> str:
    from openai import OpenAI

    from offline_search.openai_chat import ask, image_data_url, image_message
    from demo.server import ServerConfig, VllmServer

    model_dir = config.model or _tiny_model(config.workdir / "tiny-llava")
    server_config = ServerConfig(
        model=str(model_dir),
        log_file=config.workdir / "vllm-serve.log",
        served_model_name=SERVED_NAME,
        extra_args=("--plugin", "adaspkv",
                    "--kv-cache-memory-bytes", str(config.kv_cache_memory_bytes)),
        startup_timeout_s=config.startup_timeout_s,
    )
    message = image_message(config.question, image_data_url(config.image))
    print(f"Starting `vllm serve {model_dir} --plugin adaspkv` (log: {server_config.log_file}) ...",
          flush=True)
    with VllmServer(server_config) as server:
        print(f"Server ready at {server.base_url}; asking about {config.image.name}", flush=True)
        client = OpenAI(base_url=f"{server.base_url}/v1", api_key="EMPTY")
        return ask(client, SERVED_NAME, [message], config.max_tokens)


def _tiny_model(path: Path) -> Path:
    if (path / "config.json").is_file():
        return path
    from offline_search.tiny_llava import make_tiny_llava

    print(f"Building the test kit's tiny random LLaVA in {path} (random weights: expect noise)",
          flush=True)
    return make_tiny_llava(path)
