"""What `adaspkv demo` does, without its argument parsing: find or make the artifact, start the vLLM
server(s), then run the Gradio app (or ask one question in the terminal) until Ctrl-C.

Servers are `vllm serve ART_DIR --plugin adaspkv` (the compressed model), `vllm serve MODEL_DIR` (the
dense one, for side-by-side answers) or `vllm serve MODEL_DIR --plugin adaspkv` when no artifact is
used. They run in process groups of their own and are stopped on every way out: a normal end,
Ctrl-C, SIGTERM, or an error.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Annotated

from pydantic import Field, model_validator

from demo.chat import Endpoint
from offline_search.data.bundled_models import BUNDLED_MODELS, resolve_model
from vllm_adaspkv.errors import AdaspkvError, ConfigError
from vllm_adaspkv.format import StrictModel, is_artifact
from vllm_adaspkv.format.strict import LaxPath, PathText, ServerUrl

ASSETS = Path(__file__).parent / "assets"
SERVED_NAME = "adaspkv-demo"
DENSE_NAME = "adaspkv-dense"
SHAPES_EXAMPLES = (2, 1, 7, 3, 4)  # ShapesVQA test samples offered as examples
PHOTO_QUESTION = "Describe the image."


class SearchFailed(AdaspkvError):
    """The first run's `adaspkv search` failed; the message ends with its log's last lines."""


class DemoConfig(StrictModel):
    model: PathText = "shapes-llava"  # bundled model name or checkpoint directory
    artifact: PathText = "auto"  # artifact directory, "auto" (the model's default one) or "none"
    server_url: ServerUrl | None = None  # an already running server: nothing is started for it
    dense_server_url: ServerUrl | None = None
    compare_dense: bool = False  # side-by-side answers of the dense model
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, lt=65536)] = 7860  # Gradio's; 0 picks a free one
    workdir: LaxPath = Path("runs/demo")
    max_tokens: Annotated[int, Field(ge=1)] = 32
    history_turns: Annotated[int, Field(ge=0)] = 0
    dtype: str | None = None  # None: the dtype the checkpoint is stored in (float32 for the bundled models)
    kv_cache_memory_bytes: Annotated[int, Field(ge=1 << 20)] = 256 << 20
    search_trials: Annotated[int, Field(ge=1)] = 3
    startup_timeout_s: Annotated[float, Field(gt=0)] = 900.0
    once: bool = False  # ask one question in the terminal instead of starting the app
    image: LaxPath | None = None  # --once: None asks a ShapesVQA test sample
    question: str | None = None
    shapes_index: Annotated[int, Field(ge=0)] = 2

    @model_validator(mode="after")
    def _consistent(self) -> DemoConfig:
        if self.artifact not in ("auto", "none") and not is_artifact(self.artifact):
            raise ValueError(f"--artifact {self.artifact}: not an artifact directory (no adaspkv.json); "
                             "make one with `adaspkv search`, or pass auto or none")
        if self.dense_server_url is not None and not self.compare_dense:
            raise ValueError("--dense-server-url goes with --compare-dense")
        if (self.image is not None or self.question is not None) and not self.once:
            raise ValueError("--image and --question go with --once; in the app, upload the image in the browser")
        if self.image is not None and not self.image.is_file():
            raise ValueError(f"--image {self.image}: no such file")
        if self.image is not None and self.question is None:
            raise ValueError(f"--image {self.image} needs a --question")
        if self.question is not None and not self.question.strip():
            raise ValueError("--question is empty")
        return self


def default_artifact_dir(workdir: Path, model: str) -> Path:
    """Where `--artifact auto` keeps the artifact it searched for `model`."""
    name = model if model in BUNDLED_MODELS else Path(model).resolve().name
    return workdir / "artifacts" / name


SEARCH_WINDOW = 512  # tokens: calibration and objective windows of the first run's search, at most
# Weight sparsity of the first run's search. Measured on smol-llava (2026-12-07): at 50 % (lognorm, KV <= 6
# bits) it answered "How many shapes are there?" with its system prompt; at 30 % (lognorm, 6-bit KV) it
# answers in sentences ("There are 3 shapes: ..."). shapes-llava loses little at either (50 % magnitude: 3.7
# points of ShapesVQA; tests/demo/test_browser.py checks its answer at this default).
SEARCH_SPARSITY = 0.3


def search_command(model: str, model_dir: Path, out: Path, trials: int) -> list[str]:
    """A short joint search: 30% weight sparsity, KV bits at most 6 on average, text windows of the model's
    context up to SEARCH_WINDOW tokens (smol-llava's 8192-token windows would take an hour here)."""
    from vllm_adaspkv.format import read_geometry

    window = min(SEARCH_WINDOW, read_geometry(model_dir).max_position_embeddings)
    return [sys.executable, "-m", "offline_search.cli.main", "search", "--model", model, "--sparsity", str(SEARCH_SPARSITY),
            "--kv-bits-budget", "6", "--trials", str(trials), "--seq-len", str(window), "--out", str(out)]


def ensure_artifact(model: str, model_dir: Path, out: Path, trials: int) -> Path:
    """The artifact in `out`, searched on first use (about a minute for shapes-llava on 2 CPU cores).
    One whose base model is gone from where it points (an older release, a moved installation) is
    pointed at `model_dir` when that has the base's content hash, and searched again otherwise; one
    made from another model that is still there is refused."""
    from vllm_adaspkv.format import ArtifactError, base_model_dir, model_sha256, read_plan, relocate_base_model

    if (out / "adaspkv.json").is_file():
        try:
            plan = read_plan(out)
        except ArtifactError as exc:
            print(f"The demo's artifact {out} cannot be read ({exc}); searching it again", flush=True)
        else:
            base = base_model_dir(plan, out)
            if base.resolve() == model_dir.resolve():
                return out
            if (base / "config.json").is_file():
                raise ArtifactError(f"{out} was made from {base}, not {model_dir}; delete it or pass --artifact")
            if model_sha256(model_dir) == plan.base_model.sha256:  # the same model, moved
                relocate_base_model(out, model_dir)
                return out
            print(f"The demo's artifact {out} was made from {base}, which is gone; searching it again", flush=True)
    else:
        print(f"No artifact for {model} yet: searching one in {trials} trials into {out} (first run only) ...",
              flush=True)
    log = out.parent / f"{out.name}-search.log"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        done = subprocess.run(search_command(model, model_dir, out, trials), stdout=f, stderr=subprocess.STDOUT)
    if done.returncode != 0 or not (out / "adaspkv.json").is_file():
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise SearchFailed(f"`adaspkv search` failed (exit code {done.returncode}); last lines of {log}:\n{tail}")
    print(f"artifact written to {out} (search log: {log})", flush=True)
    return out


def resolve_artifact(config: DemoConfig, model_dir: Path) -> Path | None:
    if config.artifact == "none":
        return None
    if config.artifact == "auto":
        if config.server_url is not None:  # somebody else's server: its profile is unknown
            return None
        return ensure_artifact(config.model, model_dir, default_artifact_dir(config.workdir, config.model),
                               config.search_trials)
    return Path(config.artifact)


def base_model_dir(model_dir: Path, artifact: Path | None) -> Path:
    """The dense model: the artifact's base model, or the model itself."""
    if artifact is None:
        return model_dir
    from vllm_adaspkv.format import base_model_dir, read_plan

    return base_model_dir(read_plan(artifact), artifact)


def stored_dtype(model_dir: Path) -> str:
    """The dtype the checkpoint's language model is stored in, as vLLM's --dtype names it: vLLM's "auto"
    serves a float32 checkpoint in a 16-bit type, and the bundled models' scores are float32 ones."""
    from offline_search.data.checkpoint import CheckpointWeights

    return str(CheckpointWeights(model_dir).dtype).removeprefix("torch.")


def serve_args(config: DemoConfig, base: Path, plugin: bool) -> tuple[str, ...]:
    dtype = config.dtype or stored_dtype(base)
    args = ("--dtype", dtype, "--kv-cache-memory-bytes", str(config.kv_cache_memory_bytes))
    return (("--plugin", "adaspkv") if plugin else ()) + args


def start_server(stack: ExitStack, config: DemoConfig, target: Path, name: str, args: tuple[str, ...],
                 label: str) -> Endpoint:
    """`vllm serve target ARGS` until `stack` closes; returns its endpoint once /health answers."""
    from offline_search.evaluation.vllm_server import ServerConfig, VllmServer

    server_config = ServerConfig(model=str(target), log_file=config.workdir / f"vllm-serve-{name}.log",
                                 served_model_name=name, extra_args=args,
                                 startup_timeout_s=config.startup_timeout_s)
    server = VllmServer(server_config)
    print(f"Starting `vllm serve {target} {' '.join(args)}` (log: {server_config.log_file}) ...", flush=True)
    stack.enter_context(server)
    print(f"vLLM server ready at {server.base_url}", flush=True)
    return Endpoint(url=server.base_url, model=name, label=label)


@contextmanager
def serving(config: DemoConfig, model_dir: Path, artifact: Path | None) -> Iterator[tuple[Endpoint, Endpoint | None]]:
    """(endpoint to chat with, dense endpoint or None), with the servers this demo started running."""
    label = "compressed" if artifact is not None else "served"
    base = base_model_dir(model_dir, artifact)
    with ExitStack() as stack:
        if config.server_url is not None:
            main = Endpoint(url=config.server_url, label=label)
        else:
            main = start_server(stack, config, artifact or model_dir, SERVED_NAME, serve_args(config, base, True),
                                label)
        dense = None
        if config.compare_dense:
            if config.dense_server_url is not None:
                dense = Endpoint(url=config.dense_server_url, label="dense")
            else:
                dense = start_server(stack, config, base, DENSE_NAME, serve_args(config, base, False), "dense")
        yield main, dense


@contextmanager
def stop_signals() -> Iterator[None]:
    """Ctrl-C (SIGINT) and SIGTERM end the demo by an exception, so that the servers are stopped on the
    way out. SIGINT is set explicitly: a shell starts background jobs with it ignored."""
    def on_sigterm(signum, frame):
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, handler) for sig, handler in
                ((signal.SIGTERM, on_sigterm), (signal.SIGINT, signal.default_int_handler))}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def shapes_examples(workdir: Path) -> list:
    """ShapesVQA test samples saved as PNG, then the bundled photos."""
    from demo.app import Example
    from offline_search.data import shapes_vqa

    folder = workdir / "examples"
    folder.mkdir(parents=True, exist_ok=True)
    examples = []
    for index in SHAPES_EXAMPLES:
        sample = shapes_vqa.sample("test", index)
        path = folder / f"shapesvqa-test-{index}.png"
        if not path.is_file():
            sample.image.save(path)
        examples.append(Example(path.resolve(), sample.question))
    photos = sorted((ASSETS / "images").glob("*.jpg"))
    return examples + [Example(p.resolve(), PHOTO_QUESTION) for p in photos]


def check_port(host: str, port: int) -> int:
    """`port`, or a free one for 0; a port in use is reported before any server is started."""
    import socket

    from offline_search.evaluation.vllm_server import free_port

    if port == 0:
        return free_port(host)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # as the web server will: a port left in TIME_WAIT by the last demo is free, a listening one is not
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise ConfigError(f"--port {port}: cannot listen on {host}:{port} ({exc.strerror}); pick another "
                             "port, or --port 0 for a free one") from None
    return port


def run_app(config: DemoConfig) -> int:
    from demo.app import AppConfig, launch

    port = check_port(config.host, config.port)
    model_dir = resolve_model(config.model)
    artifact = resolve_artifact(config, model_dir)
    examples = tuple(shapes_examples(config.workdir))
    with serving(config, model_dir, artifact) as (main, dense):
        app_config = AppConfig(compressed=main, dense=dense, artifact=artifact, max_tokens=config.max_tokens,
                               history_turns=config.history_turns, examples=examples)
        app, url = launch(app_config, config.host, port,
                          allowed_paths=(config.workdir.resolve(), ASSETS))
        print(f"\nadaspkv demo: open {url} in a browser (Ctrl-C stops the demo and its servers)", flush=True)
        try:
            while True:
                time.sleep(1.0)
        except KeyboardInterrupt:
            print("\nadaspkv demo: stopping ...", flush=True)
        finally:
            app.close()
    return 0


def image_and_question(config: DemoConfig) -> tuple[Path, str, str | None]:
    """--once: the user's image and question, or a ShapesVQA test sample saved as PNG with its answer."""
    from offline_search.data import shapes_vqa

    if config.image is not None:
        return config.image, config.question, None
    sample = shapes_vqa.sample("test", config.shapes_index)
    path = config.workdir / f"shapesvqa-test-{config.shapes_index}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    sample.image.save(path)
    return path, config.question or sample.question, None if config.question else sample.answer


def run_once(config: DemoConfig) -> int:
    """Starts the server(s), asks one question, prints the answer(s) and stops."""
    from demo.chat import AnswerStats, build_messages, checked_image_url, stream_answer
    from offline_search.data.shapes_vqa import is_correct

    model_dir = resolve_model(config.model)
    artifact = resolve_artifact(config, model_dir)
    image, question, expected = image_and_question(config)
    messages = build_messages(checked_image_url(image), question)
    with serving(config, model_dir, artifact) as (main, dense):
        print(f"Q: {question}  (image {image})")
        for endpoint in (main, dense) if dense else (main,):
            answer, stats = "", None
            for item in stream_answer(endpoint, messages, config.max_tokens):
                stats, answer = (item, answer) if isinstance(item, AnswerStats) else (stats, item)
            print(f"A ({endpoint.label}): {answer.strip()}\n   {stats.describe()}")
            if expected is not None:
                print(f"   expected: {expected} ({'correct' if is_correct(answer, expected) else 'wrong'})")
    return 0
