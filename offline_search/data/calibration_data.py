"""Calibration and objective inputs: a text stream (bundled WikiText-2, a text file, or a Hugging Face
`datasets` dataset), and image + prompt samples from ShapesVQA or from a folder (each image
`NAME.jpg|jpeg|png` beside `NAME.txt` holding its prompt)."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from offline_search.data import shapes_vqa
from offline_search.data.text_data import joined_text, wikitext_path
from vllm_adaspkv.errors import ConfigError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


DATASET_PREFIX = "dataset:"


def text_tokens(source: str, tokenizer) -> torch.Tensor:
    """The text as one token stream [n]. `source`: "wikitext2" (the bundled validation split), a UTF-8
    file, or "dataset:NAME[:CONFIG]:SPLIT" (a `datasets` dataset with a "text" column: a Hub id
    such as dataset:wikitext:wikitext-2-raw-v1:train, or a local folder of text files)."""
    if source.startswith(DATASET_PREFIX):
        text = dataset_text(source)
    else:
        path = wikitext_path("validation") if source == "wikitext2" else Path(source)
        text = joined_text(path)
    if not text.strip():
        raise ConfigError(f"calibration text {source!r} is empty")
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])


def dataset_text(source: str) -> str:
    """The rows of a `datasets` dataset's "text" column, joined with "\n\n" like WikiText-2."""
    parts = source[len(DATASET_PREFIX):].split(":")
    if len(parts) not in (2, 3) or not all(parts):
        raise ConfigError(f"calibration text {source!r}: write dataset:NAME:SPLIT or dataset:NAME:CONFIG:SPLIT")
    name, config, split = (parts[0], None, parts[1]) if len(parts) == 2 else parts
    import datasets

    try:
        rows = datasets.load_dataset(name, config, split=split)
    except (OSError, ValueError) as exc:  # unreachable hub, unknown name, bad split
        raise ConfigError(f"calibration text {source!r}: the dataset cannot be loaded ({exc})") from None
    if "text" not in rows.column_names:
        raise ConfigError(f"calibration text {source!r}: no 'text' column (columns: {', '.join(rows.column_names)})")
    return "\n\n".join(rows["text"])


def image_samples(source: str, count: int, image_size: int) -> list[shapes_vqa.Sample]:
    """`count` image conversations: ShapesVQA train-split questions with their answers, or the
    first `count` images of a folder (sorted by name) with their prompts and no answer."""
    if source == "shapesvqa":
        return shapes_vqa.samples("train", count, image_size)
    folder = Path(source)
    if not folder.is_dir():
        raise ConfigError(f"calibration images {source!r}: neither 'shapesvqa' nor a folder")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    pairs = [(p, p.with_suffix(".txt")) for p in images if p.with_suffix(".txt").is_file()]
    if not pairs:
        raise ConfigError(f"calibration folder {source!r} has no image (.jpg/.jpeg/.png) with a prompt "
                         "in a .txt file of the same name")
    samples = []
    for image_path, prompt_path in pairs[:count]:
        prompt = prompt_path.read_text(encoding="utf-8").strip()
        if not prompt:
            raise ConfigError(f"calibration prompt file {str(prompt_path)!r} is empty")
        try:
            image = Image.open(image_path).convert("RGB")
        except OSError as exc:
            raise ConfigError(f"calibration image {str(image_path)!r} cannot be read ({exc})") from None
        samples.append(shapes_vqa.Sample(image=image, question=prompt, answer="", question_type="folder", shapes=()))
    return samples
