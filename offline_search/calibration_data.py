"""Calibration and objective inputs read from disk: a text stream, and image + prompt samples from
ShapesVQA or from a folder (each image `NAME.jpg|jpeg|png` beside `NAME.txt` holding its prompt)."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from offline_search import shapes_vqa
from offline_search.text_data import joined_text, wikitext_path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def text_tokens(source: str, tokenizer) -> torch.Tensor:
    """The text as one token stream [n]; `source` is "wikitext2" (validation split) or a file path."""
    path = wikitext_path("validation") if source == "wikitext2" else Path(source)
    text = joined_text(path)
    if not text.strip():
        raise ValueError(f"calibration text file {str(path)!r} is empty")
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])


def image_samples(source: str, count: int, image_size: int) -> list[shapes_vqa.Sample]:
    """`count` image conversations: ShapesVQA train-split questions with their answers, or the
    first `count` images of a folder (sorted by name) with their prompts and no answer."""
    if source == "shapesvqa":
        return shapes_vqa.samples("train", count, image_size)
    folder = Path(source)
    if not folder.is_dir():
        raise ValueError(f"calibration images {source!r}: neither 'shapesvqa' nor a folder")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    pairs = [(p, p.with_suffix(".txt")) for p in images if p.with_suffix(".txt").is_file()]
    if not pairs:
        raise ValueError(f"calibration folder {source!r} has no image (.jpg/.jpeg/.png) with a prompt "
                         "in a .txt file of the same name")
    samples = []
    for image_path, prompt_path in pairs[:count]:
        prompt = prompt_path.read_text(encoding="utf-8").strip()
        if not prompt:
            raise ValueError(f"calibration prompt file {str(prompt_path)!r} is empty")
        try:
            image = Image.open(image_path).convert("RGB")
        except OSError as exc:
            raise ValueError(f"calibration image {str(image_path)!r} cannot be read ({exc})") from None
        samples.append(shapes_vqa.Sample(image=image, question=prompt, answer="", question_type="folder", shapes=()))
    return samples
