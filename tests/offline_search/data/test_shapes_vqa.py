from collections import Counter

import pytest

from offline_search.data import shapes_vqa
from offline_search.data.shapes_vqa import COLOURS, QUESTION_TYPES, is_correct, normalize_answer, sample, samples


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


def test_patch_shapes_maps_every_patch_to_its_quadrant():
    red = shapes_vqa.Shape("circle", "red", column=1, row=0)  # top right
    blue = shapes_vqa.Shape("cross", "blue", column=0, row=1)  # bottom left
    assert shapes_vqa.patch_shapes((red, blue), grid=2) == [None, red, blue, None]
    grid4 = shapes_vqa.patch_shapes((red, blue), grid=4)  # 2x2 patches per quadrant
    assert grid4[2:4] == [red, red] and grid4[6:8] == [red, red] and grid4[8:10] == [blue, blue]
    assert grid4.count(None) == 8


def test_patch_shapes_rejects_a_grid_that_splits_quadrants():
    with pytest.raises(ValueError, match=r"patch grid 3 must be even and >= 2"):
        shapes_vqa.patch_shapes((), grid=3)


def test_naming_words_name_colour_kind_and_place():
    shape = shapes_vqa.Shape("triangle", "green", column=0, row=1)
    assert shapes_vqa.naming_words(shape) == ("green", "triangle", "left", "bottom")


def test_paired_difference_by_hand():
    # Discordant questions: 0 and 1 lost, 3 gained; n = 3, P(X <= 1) = (1 + 3) / 8, doubled: 1.0.
    assert shapes_vqa.paired_difference([True, True, True, False], [False, False, True, True]) == (2, 1, 1.0)
    # Six lost, none gained: 2 * (1/2)^6.
    assert shapes_vqa.paired_difference([True] * 6 + [False], [False] * 7) == (6, 0, 0.03125)
    assert shapes_vqa.paired_difference([True, False], [True, False]) == (0, 0, 1.0)


def test_paired_difference_needs_the_same_questions():
    with pytest.raises(ValueError, match=r"paired_difference: 2 and 1 answers; the runs must answer the same questions"):
        shapes_vqa.paired_difference([True, False], [True])


def test_compare_test_answers_scores_both_runs_against_the_test_questions():
    answers = [s.answer for s in shapes_vqa.samples("test", 5)]
    wrong = ["purple" if a != "purple" else "green" for a in answers]
    assert shapes_vqa.compare_test_answers(answers, wrong[:2] + answers[2:]) == (2, 0, 0.5)
    assert shapes_vqa.compare_test_answers(wrong, answers) == (0, 5, 0.0625)


def test_caption_slots_name_every_quadrant_in_order():
    scene = (shapes_vqa.Shape("circle", "red", 1, 1), shapes_vqa.Shape("cross", "blue", 0, 0))
    assert shapes_vqa.caption_slots(scene) == (
        "blue", "cross", "top", "left",
        "no", "shape", "top", "right",
        "no", "shape", "bottom", "left",
        "red", "circle", "bottom", "right")
