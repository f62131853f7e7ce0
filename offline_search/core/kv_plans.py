"""Per-layer KV-cache bit plans for the search: pure functions over lists of numbers.

Every plan a trial produces satisfies its constraint by construction (the sampled values are
mapped onto the constraint deterministically), so no trial is thrown away.
"""

from __future__ import annotations

from vllm_adaspkv.errors import ConfigError
from vllm_adaspkv.kv.quant import KV_BITS


def mean_bits(bits: list[int]) -> float:
    return sum(bits) / len(bits)


def check_choices(choices: tuple[int, ...]) -> tuple[int, ...]:
    """Sorted ascending, each one a width the quantizer stores."""
    bad = [b for b in choices if b not in KV_BITS]
    if bad or not choices:
        raise ConfigError(f"allowed {', '.join(map(str, KV_BITS))}")
    return tuple(sorted(set(choices)))


def _check_ascending(choices: tuple[int, ...]) -> None:
    # stepping "one choice down" in an unsorted tuple would turn a 16-bit layer into a 2-bit one
    if list(choices) != sorted(set(choices)):
        raise ValueError(f"KV choices {choices} must be distinct and ascending (check_choices sorts them)")


def fit_budget(bits: list[int], budget: float, choices: tuple[int, ...]) -> list[int]:
    """Lowers layers one choice at a time, always the widest (the last of equals), until the mean is
    at most `budget`. choices sorted ascending."""
    _check_ascending(choices)
    if budget < choices[0]:
        raise ConfigError(f"--kv-bits-budget {budget:g} is below the narrowest choice, {choices[0]} bits")
    bits = list(bits)
    while mean_bits(bits) > budget + 1e-9:
        widest = max(range(len(bits)), key=lambda i: (bits[i], i))
        bits[widest] = choices[choices.index(bits[widest]) - 1]
    return bits


def fill_budget(bits: list[int], budget: float, choices: tuple[int, ...]) -> list[int]:
    """Widens layers one choice at a time, always the narrowest (the first of equals), while the mean
    stays at most `budget`: bits left unused only cost quality. choices sorted ascending."""
    _check_ascending(choices)
    bits = list(bits)
    while True:
        widenable = [i for i, b in enumerate(bits) if b != choices[-1]]
        if not widenable:
            return bits
        narrowest = min(widenable, key=lambda i: (bits[i], i))
        wider = bits[:narrowest] + [choices[choices.index(bits[narrowest]) + 1]] + bits[narrowest + 1:]
        if mean_bits(wider) > budget + 1e-9:
            return bits
        bits = wider


def equal_split(priorities: list[float], high: int = 8, low: int = 6) -> list[int]:
    """The paper's constraint: half the layers at `high` bits (those of highest priority), the others
    at `low`; with an odd count the extra layer gets `low`, so the mean never exceeds (high+low)/2."""
    count = len(priorities) // 2
    ranked = sorted(range(len(priorities)), key=lambda i: (-priorities[i], i))
    chosen = set(ranked[:count])
    return [high if i in chosen else low for i in range(len(priorities))]


def uniform_bits_within(budget: float | None, choices: tuple[int, ...]) -> int:
    """The widest choice that a uniform plan can use within the budget (the search's first trial)."""
    fitting = [c for c in choices if budget is None or c <= budget + 1e-9]
    if not fitting:
        raise ConfigError(f"--kv-bits-budget {budget:g} is below the narrowest choice, {choices[0]} bits")
    return fitting[-1]
