"""ShapesVQA: procedurally drawn images of coloured shapes with one-word questions and answers.

Deterministic: sample `i` of a split is a function of (split seed, i) alone, so every machine draws
the same data and the splits never overlap. An image holds one to four shapes, each in its own
quadrant (so "left", "right", "top" and "bottom" are unambiguous), on a varied light background.
Questions ask for a colour, a shape kind, a position, a count, existence, or a colour through a
spatial relation ("What colour is the shape left of the square?").
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (30, 150, 50),
    "blue": (35, 75, 215),
    "yellow": (230, 195, 20),
    "purple": (130, 45, 165),
    "black": (20, 20, 20),
}
KINDS = ("circle", "square", "triangle", "cross")
QUADRANTS = ((0, 0), (1, 0), (0, 1), (1, 1))  # (column, row): top-left, top-right, ...
NUMBERS = ("zero", "one", "two", "three", "four")
SPLIT_SEEDS = {"train": 0, "validation": 1, "test": 2}
QUESTION_TYPES = ("colour", "shape", "count", "left_right", "top_bottom", "exists", "relation")


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    column: int  # 0 left, 1 right
    row: int  # 0 top, 1 bottom


@dataclass(frozen=True)
class Sample:
    image: Image.Image
    question: str
    answer: str
    question_type: str
    shapes: tuple[Shape, ...]


def split_seed(split: str) -> int:
    if split not in SPLIT_SEEDS:
        raise ValueError(f"ShapesVQA split {split!r} is not one of {', '.join(SPLIT_SEEDS)}")
    return SPLIT_SEEDS[split]


def sample(split: str, index: int, image_size: int = 64) -> Sample:
    """Sample `index` of `split`; the same arguments always give the same sample."""
    if index < 0:
        raise ValueError(f"ShapesVQA index {index} must be >= 0")
    rng = random.Random(f"shapes-vqa/{split_seed(split)}/{index}")
    shapes = _draw_scene(rng)
    question_type = QUESTION_TYPES[index % len(QUESTION_TYPES)]
    question, answer, question_type = _ask(rng, shapes, question_type)
    return Sample(_render(rng, shapes, image_size), question, answer, question_type, shapes)


def samples(split: str, count: int, image_size: int = 64, start: int = 0) -> list[Sample]:
    return [sample(split, i, image_size) for i in range(start, start + count)]


def caption(shapes: tuple[Shape, ...]) -> str:
    """Every shape, row by row: "red circle top left, blue square bottom right"."""
    ordered = sorted(shapes, key=lambda s: (s.row, s.column))
    return ", ".join(f"{s.colour} {s.kind} {('top', 'bottom')[s.row]} {('left', 'right')[s.column]}"
                     for s in ordered)


EMPTY_QUADRANT = ("no", "shape")


def caption_slots(shapes: tuple[Shape, ...]) -> tuple[str, ...]:
    """Four words per quadrant, quadrants in `QUADRANTS` order (top left, top right, bottom left, bottom
    right): colour, kind, row, column ("red circle top left"), or "no shape top right" for an empty one.
    16 words: what smol-llava's 16 image tokens are trained to read as (`grounding.token_alignment_loss`)."""
    by_place = {(s.column, s.row): s for s in shapes}
    words: list[str] = []
    for column, row in QUADRANTS:
        s = by_place.get((column, row))
        words += [s.colour, s.kind] if s else list(EMPTY_QUADRANT)
        words += [("top", "bottom")[row], ("left", "right")[column]]
    return tuple(words)


def patch_shapes(shapes: tuple[Shape, ...], grid: int) -> list[Shape | None]:
    """The shape in each patch's quadrant (None where empty), patches row by row on a `grid` x
    `grid` patch grid."""
    if grid < 2 or grid % 2:
        raise ValueError(f"patch grid {grid} must be even and >= 2 (every quadrant a whole number of patches)")
    by_place = {(s.column, s.row): s for s in shapes}
    return [by_place.get((2 * column // grid, 2 * row // grid)) for row in range(grid) for column in range(grid)]


def patch_labels(shapes: tuple[Shape, ...], grid: int) -> list[tuple[int, int]]:
    """(kind index, colour index) of the shape in each patch's quadrant, (len(KINDS), len(COLOURS)) where
    empty: the targets of the trainers' patch probe (`grounding.PatchProbe`)."""
    colours = list(COLOURS)
    return [(KINDS.index(s.kind), colours.index(s.colour)) if s else (len(KINDS), len(colours))
            for s in patch_shapes(shapes, grid)]


def naming_words(shape: Shape) -> tuple[str, str, str, str]:
    """The words that name a shape and its place: ("red", "circle", "left", "top")."""
    return shape.colour, shape.kind, ("left", "right")[shape.column], ("top", "bottom")[shape.row]


def normalize_answer(text: str) -> str:
    """First word, lower case, no punctuation; digits become number words ("2" -> "two")."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    if not words:
        return ""
    word = words[0]
    return NUMBERS[int(word)] if word.isdigit() and int(word) < len(NUMBERS) else word


def is_correct(prediction: str, answer: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(answer)


def paired_difference(correct_a: Sequence[bool], correct_b: Sequence[bool]) -> tuple[int, int, float]:
    """(questions right in A and wrong in B, the reverse, exact two-sided McNemar p-value).

    The p-value is the binomial test on the discordant questions: how likely a split at least this
    uneven is if A and B were equally good, i.e. whether an accuracy gap is more than chance.
    """
    if len(correct_a) != len(correct_b):
        raise ValueError(f"paired_difference: {len(correct_a)} and {len(correct_b)} answers; "
                         "the runs must answer the same questions")
    lost = sum(a and not b for a, b in zip(correct_a, correct_b))
    gained = sum(b and not a for a, b in zip(correct_a, correct_b))
    n = lost + gained
    tail = sum(math.comb(n, k) for k in range(min(lost, gained) + 1)) / 2 ** n
    return lost, gained, min(1.0, 2 * tail)


def compare_test_answers(predictions_a: Sequence[str], predictions_b: Sequence[str]) -> tuple[int, int, float]:
    """paired_difference of two runs' answers to the first N test questions (what `adaspkv eval`
    asks, in order), each scored against the questions' answers."""
    answers = [s.answer for s in samples("test", len(predictions_a))]
    return paired_difference([is_correct(x, a) for x, a in zip(predictions_a, answers)],
                             [is_correct(x, a) for x, a in zip(predictions_b, answers)])


def _draw_scene(rng: random.Random) -> tuple[Shape, ...]:
    count = rng.randint(1, 4)
    places = rng.sample(QUADRANTS, count)
    return tuple(Shape(rng.choice(KINDS), rng.choice(list(COLOURS)), c, r) for c, r in places)


def _ask(rng: random.Random, shapes: tuple[Shape, ...], wanted: str) -> tuple[str, str, str]:
    """A question of type `wanted` if the scene allows one, else a count question."""
    kinds = [s.kind for s in shapes]
    colours = [s.colour for s in shapes]
    unique_kind = [s for s in shapes if kinds.count(s.kind) == 1]
    unique_colour = [s for s in shapes if colours.count(s.colour) == 1]
    unique_both = [s for s in shapes if sum(t.kind == s.kind and t.colour == s.colour for t in shapes) == 1]
    if wanted == "colour" and unique_kind:
        s = rng.choice(unique_kind)
        return f"What colour is the {s.kind}?", s.colour, wanted
    if wanted == "shape" and unique_colour:
        s = rng.choice(unique_colour)
        return f"What shape is the {s.colour} one?", s.kind, wanted
    if wanted == "left_right" and unique_both:
        s = rng.choice(unique_both)
        return f"Is the {s.colour} {s.kind} on the left or the right?", ("left", "right")[s.column], wanted
    if wanted == "top_bottom" and unique_both:
        s = rng.choice(unique_both)
        return f"Is the {s.colour} {s.kind} at the top or the bottom?", ("top", "bottom")[s.row], wanted
    if wanted == "exists":
        kind, colour = rng.choice(KINDS), rng.choice(list(COLOURS))
        if rng.random() < 0.5:  # half of them about a shape that is there
            s = rng.choice(shapes)
            kind, colour = s.kind, s.colour
        present = any(s.kind == kind and s.colour == colour for s in shapes)
        return f"Is there a {colour} {kind}?", ("no", "yes")[present], wanted
    if wanted == "relation":
        pairs = [(a, b) for a in shapes for b in unique_kind
                 if a.row == b.row and a.column == 0 and b.column == 1]
        if pairs:
            left, right = rng.choice(pairs)
            return f"What colour is the shape left of the {right.kind}?", left.colour, wanted
    return "How many shapes are there?", NUMBERS[len(shapes)], "count"


def _render(rng: random.Random, shapes: tuple[Shape, ...], size: int) -> Image.Image:
    background = tuple(rng.randint(185, 255) for _ in range(3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    # Faint stripes vary the background without hiding the shapes.
    for _ in range(rng.randint(0, 3)):
        tint = tuple(max(0, c - rng.randint(10, 35)) for c in background)
        x = rng.randrange(size)
        draw.line([(x, 0), (x + rng.randint(-size, size), size)], fill=tint, width=rng.randint(1, 3))
    half = size // 2
    for s in shapes:
        extent = rng.randint(half * 11 // 20, half * 17 // 20)  # 55% .. 85% of a quadrant
        x0 = s.column * half + rng.randint(1, half - extent - 1)
        y0 = s.row * half + rng.randint(1, half - extent - 1)
        _draw_shape(draw, s.kind, COLOURS[s.colour], x0, y0, extent)
    return image


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, fill, x0: int, y0: int, extent: int) -> None:
    x1, y1 = x0 + extent, y0 + extent
    if kind == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=fill)
    elif kind == "square":
        draw.rectangle([x0, y0, x1, y1], fill=fill)
    elif kind == "triangle":
        draw.polygon([(x0 + extent / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    else:  # cross
        third = extent / 3
        draw.rectangle([x0 + third, y0, x1 - third, y1], fill=fill)
        draw.rectangle([x0, y0 + third, x1, y1 - third], fill=fill)
