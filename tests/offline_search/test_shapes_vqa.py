from collections import Counter

import pytest

from offline_search import shapes_vqa
from offline_search.shapes_vqa import COLOURS, QUESTION_TYPES, is_correct, normalize_answer, sample, samples


def test_same_index_same_sample_and_splits_differ():
    a, b = sample("train", 7), sample("train", 7)
    assert (a.question, a.answer, a.shapes) == (b.question, b.answer, b.shapes)
    assert a.image.tobytes() == b.image.tobytes()
    train = {(s.shapes, s.question) for s in samples("train", 200)}
    test = {(s.shapes, s.question) for s in samples("test", 200)}
    assert len(train & test) < 20  # only coincidences of tiny scenes


def test_bad_split_and_index():
    with pytest.raises(ValueError, match=r"ShapesVQA split 'dev' is not one of train, validation, test"):
        sample("dev", 0)
    with pytest.raises(ValueError, match=r"ShapesVQA index -1 must be >= 0"):
        sample("train", -1)


def test_every_question_type_occurs_and_answers_are_single_words():
    batch = samples("validation", 700)
    assert set(Counter(s.question_type for s in batch)) == set(QUESTION_TYPES)
    assert all(len(s.answer.split()) == 1 for s in batch)


def test_answers_follow_from_the_scene():
    for s in samples("test", 300):
        shapes = s.shapes
        if s.question_type == "count":
            assert s.answer == shapes_vqa.NUMBERS[len(shapes)]
        elif s.question_type == "colour":
            kind = s.question.removeprefix("What colour is the ").removesuffix("?")
            assert [x.colour for x in shapes if x.kind == kind] == [s.answer]
        elif s.question_type == "shape":
            colour = s.question.split()[4]
            assert [x.kind for x in shapes if x.colour == colour] == [s.answer]
        elif s.question_type == "relation":
            kind = s.question.removeprefix("What colour is the shape left of the ").removesuffix("?")
            (right,) = [x for x in shapes if x.kind == kind]
            (left,) = [x for x in shapes if x.row == right.row and x.column == 0]
            assert right.column == 1 and left.colour == s.answer


def test_shapes_are_drawn_in_their_colour_and_quadrant():
    s = sample("train", 3, image_size=64)
    for shape in s.shapes:
        x0, y0 = shape.column * 32, shape.row * 32
        pixels = [s.image.getpixel((x, y)) for x in range(x0, x0 + 32) for y in range(y0, y0 + 32)]
        assert COLOURS[shape.colour] in pixels


@pytest.mark.parametrize(
    ("prediction", "answer", "expected"),
    [("Red.", "red", True), (" red</s>", "red", True), ("2", "two", True), ("blue", "red", False),
     ("", "red", False), ("left side", "left", True)],
)
def test_scorer(prediction, answer, expected):
    assert is_correct(prediction, answer) is expected


def test_normalize_answer():
    assert normalize_answer("  Three!") == "three"
    assert normalize_answer("...") == ""
