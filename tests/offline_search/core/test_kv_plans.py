import pytest

from offline_search.core.kv_plans import (
    check_choices,
    equal_split,
    fill_budget,
    fit_budget,
    mean_bits,
    uniform_bits_within,
)


def test_fit_budget_by_hand():
    choices = (2, 4, 6, 8, 16)
    # mean 9.5 > 6: 16 -> 8 (mean 7.5), then the last 8 -> 6 (7.0), then the next 8 -> 6 (6.5), ...
    assert fit_budget([16, 8, 8, 6], 6, choices) == [6, 6, 6, 6]
    assert fit_budget([2, 16, 2, 2], 6, choices) == [2, 16, 2, 2]  # already within: untouched
    assert fit_budget([8, 8, 8, 8], 4.5, choices) == [6, 4, 4, 4]  # ties: the last layer goes first
    assert mean_bits(fit_budget([16, 16, 16], 4.5, choices)) <= 4.5


def test_fill_budget_by_hand():
    choices = (2, 4, 6, 8, 16)
    assert fill_budget([6, 6, 4, 6], 6, choices) == [6, 6, 6, 6]  # the 4-bit layer takes the 2 unused bits
    assert fill_budget([8, 6, 4, 6], 6, choices) == [8, 6, 4, 6]  # mean exactly 6: untouched
    # mean 5.5: the first of the narrowest goes up (2 -> 4, mean 6.0), then nothing more fits
    assert fill_budget([2, 16, 2, 2], 6, choices) == [4, 16, 2, 2]
    assert fill_budget([4, 4], 5, (4, 6)) == [6, 4]
    assert fill_budget([16, 16], 16, choices) == [16, 16]  # nothing wider to take
    assert fill_budget([2, 2, 2, 2], 4.5, choices) == [6, 4, 4, 4]


def test_equal_split_by_hand():
    assert equal_split([0.1, 0.9, 0.5, 0.7]) == [6, 8, 6, 8]
    assert equal_split([0.3, 0.2, 0.1]) == [8, 6, 6]  # odd count: the extra layer gets 6 bits


def test_choices_and_errors():
    assert check_choices((8, 2, 4)) == (2, 4, 8)
    assert uniform_bits_within(6, (2, 4, 6, 8, 16)) == 6
    assert uniform_bits_within(None, (2, 4, 8)) == 8
    with pytest.raises(ValueError, match="^allowed 16, 8, 6, 4, 2$"):
        check_choices((3, 8))
    with pytest.raises(ValueError, match="--kv-bits-budget 1 is below the narrowest choice, 2 bits"):
        fit_budget([2, 2], 1, (2, 4))


def test_unsorted_choices_are_refused_rather_than_stepped_through():
    # "one choice lower" than 16 in (16, 8, 6, 4, 2) would be index -1: 2 bits
    with pytest.raises(ValueError, match=r"KV choices \(16, 8, 6, 4, 2\) must be distinct and ascending"):
        fit_budget([16, 16], 6, (16, 8, 6, 4, 2))
    with pytest.raises(ValueError, match=r"must be distinct and ascending"):
        fill_budget([2, 2], 6, (4, 2))
