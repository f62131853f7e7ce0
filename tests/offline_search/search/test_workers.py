"""The pieces that let several workers share one study, on a SQLite study in a temporary folder."""

import optuna
import pytest

from offline_search.search.workers import TrialSeededTPE, claim_plan


def _two_workers(path):
    """Two handles on one study, as two worker processes have them, each with its own sampler."""
    url = f"sqlite:///{path}"
    optuna.create_study(storage=url, study_name="s")
    return [optuna.load_study(study_name="s", storage=url, sampler=TrialSeededTPE(seed=0)) for _ in range(2)]


def test_workers_that_start_together_draw_different_trials_reproducibly(tmp_path):
    draws = []
    for run in ("a", "b"):
        first, second = _two_workers(tmp_path / f"{run}.db")
        trials = [first.ask(), second.ask()]  # both ask before either has a finished trial
        draws.append([[t.suggest_int(f"block_{b}", -2, 2) for b in range(8)] for t in trials])
    assert draws[0][0] != draws[0][1]  # seeded by trial number, not one seed per worker
    assert draws[0] == draws[1]  # and the same again on a new study


def test_a_plan_is_claimed_once(tmp_path):
    first, second = _two_workers(tmp_path / "s.db")
    running = first.ask()
    claim_plan(first, running, {"kv_bits": [8, 4]})
    same = second.ask()
    with pytest.raises(optuna.TrialPruned, match=f"the same plan as trial {running.number}"):
        claim_plan(second, same, {"kv_bits": [8, 4]})
    claim_plan(second, second.ask(), {"kv_bits": [4, 8]})  # another plan runs
