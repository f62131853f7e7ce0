"""OpenAI-compatible chat requests with an image, as any vLLM client sends them."""

from __future__ import annotations

import base64
import io
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from vllm_adaspkv.errors import ConfigError


def pil_data_url(image: Image.Image) -> str:
    """A base64 PNG data URL: lossless, so the server sees exactly these pixels."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def image_data_url(path: str | Path) -> str:
    """The image file as a base64 PNG data URL (re-encoded, so any format PIL reads works)."""
    try:
        with Image.open(path) as image:
            return pil_data_url(image)
    except (FileNotFoundError, UnidentifiedImageError) as exc:
        raise ConfigError(f"cannot read image {str(path)!r}: {exc}") from exc


def image_message(question: str, image_url: str) -> dict:
    return {
        "role": "user",
        "content": [
            {"type": "image_url", "image_url": {"url": image_url}},
            {"type": "text", "text": question},
        ],
    }


def ask(client, model: str, messages: list[dict], max_tokens: int) -> str:
    """Greedy answer of `model` to `messages` through an `openai.OpenAI` client."""
    response = client.chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens, temperature=0.0
    )
    return response.choices[0].message.content or ""
