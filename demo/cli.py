"""Serve a LLaVA with `vllm serve --plugin adaspkv` and ask it one question about an image.

By default it serves the bundled shapes-llava and asks it a ShapesVQA test question, printing the
expected answer beside the model's. The Gradio image chat replaces this terminal run in a later
release.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from offline_search import shapes_vqa
from offline_search.model_registry import resolve_model
from offline_search.shapes_vqa import is_correct

ASSETS = Path(__file__).parent / "assets"
SERVED_NAME = "adaspkv-demo"


@dataclass(frozen=True)
class DemoConfig:
    model: str  # bundled model name or checkpoint directory
    image: Path | None  # None: a ShapesVQA test image (with its question)
    question: str | None
    workdir: Path
    shapes_index: int = 0  # which ShapesVQA test sample, when no image is given
    max_tokens: int = 24
    kv_cache_memory_bytes: int = 256 << 20
    startup_timeout_s: float = 900.0

    def __post_init__(self):
        if self.image is not None and not self.image.is_file():
            raise ValueError(f"--image {self.image}: no such file")
        if self.image is not None and self.question is None:
            raise ValueError(f"--image {self.image} needs a --question")
        if self.question is not None and not self.question.strip():
            raise ValueError("--question is empty")
        if self.shapes_index < 0:
            raise ValueError(f"--shapes-index {self.shapes_index}: must be >= 0")
        if self.max_tokens < 1:
            raise ValueError(f"--max-tokens {self.max_tokens}: must be >= 1")
        if self.kv_cache_memory_bytes < 1 << 20:
            raise ValueError(f"--kv-cache-memory-bytes {self.kv_cache_memory_bytes}: must be >= 1 MiB")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="shapes-llava",
                        help="bundled model name or LLaVA checkpoint directory in the llava-hf "
                             "layout (default: %(default)s)")
    parser.add_argument("--image", type=Path, default=None,
                        help="image to ask about (default: a ShapesVQA test image); example "
                             f"photos are in {ASSETS / 'images'}")
    parser.add_argument("--question", default=None,
                        help="question to ask (default: the ShapesVQA sample's question)")
    parser.add_argument("--shapes-index", type=int, default=0,
                        help="which ShapesVQA test sample to ask about without --image (default: 0)")
    parser.add_argument("--max-tokens", type=int, default=DemoConfig.max_tokens,
                        help="answer length limit (default: %(default)s)")
    parser.add_argument("--kv-cache-memory-bytes", type=int, default=DemoConfig.kv_cache_memory_bytes,
                        help="KV-cache size handed to vLLM (default: %(default)s)")
    parser.add_argument("--workdir", type=Path, default=Path("runs/demo"),
                        help="where the question image and the server log go (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    try:
        config = DemoConfig(model=args.model, image=args.image, question=args.question,
                            workdir=args.workdir, shapes_index=args.shapes_index,
                            max_tokens=args.max_tokens, kv_cache_memory_bytes=args.kv_cache_memory_bytes)
        model_dir = resolve_model(config.model)
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"adaspkv demo: {exc}") from None
    image, question, expected = _image_and_question(config)
    answer = ask_once(config, model_dir, image, question)
    print(f"Q: {question}\nA: {answer}")
    if expected is not None:
        print(f"expected: {expected} ({'correct' if is_correct(answer, expected) else 'wrong'})")
    return 0


def _image_and_question(config: DemoConfig) -> tuple[Path, str, str | None]:
    """The user's image and question, or a ShapesVQA test sample saved as PNG, with its answer."""
    if config.image is not None:
        return config.image, config.question, None
    sample = shapes_vqa.sample("test", config.shapes_index)
    path = config.workdir / f"shapesvqa-test-{config.shapes_index}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    sample.image.save(path)
    return path, config.question or sample.question, None if config.question else sample.answer


def ask_once(config: DemoConfig, model_dir: Path, image: Path, question: str) -> str:
    from openai import OpenAI

    from demo.server import ServerConfig, VllmServer
    from offline_search.openai_chat import ask, image_data_url, image_message

    server_config = ServerConfig(
        model=str(model_dir),
        log_file=config.workdir / "vllm-serve.log",
        served_model_name=SERVED_NAME,
        extra_args=("--plugin", "adaspkv",
                    "--kv-cache-memory-bytes", str(config.kv_cache_memory_bytes)),
        startup_timeout_s=config.startup_timeout_s,
    )
    message = image_message(question, image_data_url(image))
    print(f"Starting `vllm serve {model_dir} --plugin adaspkv` (log: {server_config.log_file}) ...",
          flush=True)
    with VllmServer(server_config) as server:
        print(f"Server ready at {server.base_url}; asking about {image}", flush=True)
        client = OpenAI(base_url=f"{server.base_url}/v1", api_key="EMPTY")
        return ask(client, SERVED_NAME, [message], config.max_tokens)

