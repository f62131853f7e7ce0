"""The demo's conversation with a vLLM server: image checks, OpenAI chat messages, streamed answers.

No Gradio here: the app calls these functions, and the tests call them directly. Every failure a user
can cause or meet (no image, an oversized or corrupt image, a server that is gone or refuses the
request) is a `DemoError` whose message is meant to be shown as it is.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from PIL import Image, UnidentifiedImageError
from pydantic import Field, field_validator

from offline_search.evaluation.openai_chat import image_message, pil_data_url
from vllm_adaspkv.errors import AdaspkvError
from vllm_adaspkv.format import StrictModel
from vllm_adaspkv.format.strict import ServerUrl

MAX_IMAGE_BYTES = 10 << 20  # 10 MiB
MAX_IMAGE_SIDE = 4096  # pixels


class DemoError(AdaspkvError):
    """A failure explained in words for the user; the app shows it and keeps running."""


class Endpoint(StrictModel):
    """An OpenAI-compatible server and the model name to ask (None: the first one it lists)."""

    url: ServerUrl  # e.g. http://127.0.0.1:8000, without /v1
    model: str | None = None
    label: str = "compressed"
    timeout_s: Annotated[float, Field(gt=0)] = 120.0

    @field_validator("url")
    @classmethod
    def _base_url(cls, url: str) -> str:
        return url.rstrip("/").removesuffix("/v1")


@dataclass(frozen=True)
class AnswerStats:
    tokens: int  # completion tokens, as the server counts them
    seconds: float  # from sending the request to the last token
    first_token_s: float  # from sending the request to the first token

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def describe(self) -> str:
        tokens = f"{self.tokens} token{'' if self.tokens == 1 else 's'}"
        return (f"{tokens} in {self.seconds:.2f} s = {self.tokens_per_s:.1f} tokens/s "
                f"(first token after {self.first_token_s:.2f} s)")


def checked_image_url(path: str | Path | None) -> str:
    """The image at `path` as a PNG data URL, after the checks the demo promises its users."""
    if path is None or str(path) == "":
        raise DemoError("Please upload an image first (or pick one of the examples).")
    path = Path(path)
    if not path.is_file():
        raise DemoError(f"The image {path.name} is gone; please upload it again.")
    size = path.stat().st_size
    if size > MAX_IMAGE_BYTES:
        raise DemoError(f"The image is {size / 2**20:.1f} MB; the demo takes images up to "
                        f"{MAX_IMAGE_BYTES >> 20} MB.")
    try:
        with Image.open(path) as image:
            width, height = image.size
            if max(width, height) > MAX_IMAGE_SIDE:
                raise DemoError(f"The image is {width}x{height} pixels; the demo takes images up to "
                                f"{MAX_IMAGE_SIDE} pixels on a side.")
            image.load()  # decodes every pixel: a truncated file fails here, not on the server
            return pil_data_url(image)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DemoError(f"The file {path.name} is not an image that can be read ({exc}).") from None


def build_messages(image_url: str, question: str, history: list[tuple[str, str]] = ()) -> list[dict]:
    """OpenAI chat messages: the image with the first question, earlier (question, answer) pairs, then
    `question`. Without history the image goes with `question` itself."""
    question = (question or "").strip()
    if not question:
        raise DemoError("Please type a question about the image.")
    if not history:
        return [image_message(question, image_url)]
    (first_q, first_a), *rest = history
    messages = [image_message(first_q, image_url), {"role": "assistant", "content": first_a}]
    for q, a in rest:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return messages + [{"role": "user", "content": question}]


def _client(endpoint: Endpoint):
    from openai import OpenAI

    # no retries: a server that is gone should be reported at once, not after back-off
    return OpenAI(base_url=f"{endpoint.url}/v1", api_key="EMPTY", max_retries=0, timeout=endpoint.timeout_s)


def not_answering(endpoint: Endpoint) -> DemoError:
    return DemoError(f"The vLLM server at {endpoint.url} is not answering. Is it still running? "
                     "The demo keeps running: ask again once the server is back.")


def served_model(endpoint: Endpoint) -> str:
    """The model name to put in requests: the endpoint's, or the first one the server lists."""
    if endpoint.model:
        return endpoint.model
    import openai

    try:
        models = _client(endpoint).models.list().data
    except openai.APIConnectionError:
        raise not_answering(endpoint) from None
    except openai.APIStatusError as exc:
        raise DemoError(f"The server at {endpoint.url} did not list its models ({exc.status_code}).") from None
    if not models:
        raise DemoError(f"The server at {endpoint.url} serves no model.")
    return models[0].id


def stream_answer(endpoint: Endpoint, messages: list[dict], max_tokens: int) -> Iterator[str | AnswerStats]:
    """Streams a greedy answer: yields the text so far after every chunk, then one AnswerStats."""
    import openai

    model = served_model(endpoint)
    start = time.perf_counter()
    first = None
    text, chunks, usage = "", 0, None
    try:
        stream = _client(endpoint).chat.completions.create(
            model=model, messages=messages, max_tokens=max_tokens, temperature=0.0, stream=True,
            stream_options={"include_usage": True})
        for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            delta = chunk.choices[0].delta.content if chunk.choices else None
            if delta:
                first = first if first is not None else time.perf_counter() - start
                text += delta
                chunks += 1
                yield text
    except openai.APIConnectionError:
        raise not_answering(endpoint) from None
    except openai.APIStatusError as exc:
        detail = getattr(exc, "message", "") or str(exc)
        raise DemoError(f"The vLLM server at {endpoint.url} refused the request ({exc.status_code}): "
                        f"{detail}") from None
    seconds = time.perf_counter() - start
    tokens = usage.completion_tokens if usage is not None else chunks
    yield AnswerStats(tokens=tokens, seconds=seconds, first_token_s=first if first is not None else seconds)
