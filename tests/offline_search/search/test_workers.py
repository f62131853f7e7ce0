"""The pieces that let several workers share one study, on a SQLite study in a temporary folder."""

import optuna
import pytest

from offline_search.search.workers import TrialSeededTPE


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


def test_the_trials_of_two_seeds_are_not_one_sequence_shifted():
    def start_up_draws(seed: int) -> list[list[int]]:
        study = optuna.create_study(sampler=TrialSeededTPE(seed=seed))
        draws = []
        for _ in range(4):  # TPE's random start-up trials
            trial = study.ask()
            draws.append([trial.suggest_int(f"kv_{layer}", 0, 4) for layer in range(8)])
            study.tell(trial, float(sum(draws[-1])))
        return draws

    seed0, seed1 = start_up_draws(0), start_up_draws(1)
    assert seed0 == start_up_draws(0)  # reproducible
    assert all(a != b for a in seed0 for b in seed1)  # no trial of one seed is a trial of the other


def test_parameters_are_claimed_once_and_a_finished_plan_is_not_evaluated_again(tmp_path):
    from offline_search.search.workers import claim_params, finished_plan

    first, second = _two_workers(tmp_path / "s.db")
    running = first.ask()
    running.suggest_int("block_0", -2, 2)
    claim_params(first, running)
    second.enqueue_trial(running.params)  # another worker draws the same parameters
    twin = second.ask()
    twin.suggest_int("block_0", -2, 2)
    with pytest.raises(optuna.TrialPruned, match=f"the same parameters as trial {running.number}"):
        claim_params(second, twin)
    assert finished_plan(first, running, {"kv_bits": [8, 4]}) is None
    first.tell(running, 1.5)
    other = second.ask()
    other.suggest_int("block_0", -2, 2)
    found = finished_plan(second, other, {"kv_bits": [8, 4]})  # other parameters, the same plan
    assert found.number == running.number and found.value == 1.5


def test_a_trial_of_a_dead_process_on_this_host_is_failed_and_requeued_at_once(tmp_path):
    import subprocess
    import sys

    from offline_search.search.workers import fail_dead_trials, record_worker, worker_record

    first, _ = _two_workers(tmp_path / "s.db")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = first.ask()
    orphan.suggest_int("block_0", -2, 2)
    orphan.set_user_attr("worker", worker_record(orphan.number, pid=int(gone.stdout)))
    alive = first.ask()
    record_worker(alive)  # this process: left alone
    inherited = first.ask()  # a re-queued trial, its new runner not recorded yet: left alone
    inherited.set_user_attr("worker", orphan.user_attrs["worker"])
    fail_dead_trials(first, grace_s=60)
    states = {t.number: t.state for t in first.get_trials()}
    assert states[orphan.number] == optuna.trial.TrialState.FAIL
    assert states[alive.number] == states[inherited.number] == optuna.trial.TrialState.RUNNING
    retry = [t for t in first.get_trials() if t.system_attrs.get("failed_trial") == orphan.number]
    assert len(retry) == 1 and retry[0].state == optuna.trial.TrialState.WAITING and retry[0].params == orphan.params


def test_a_trial_whose_worker_died_before_it_recorded_itself_fails_after_the_grace_period(tmp_path):
    """Optuna's stale-trial check knows only trials that have beaten once: such a trial stayed RUNNING and
    blocked the study (a search killed between creating a trial and running it)."""
    import time

    from offline_search.search.workers import fail_dead_trials

    first, _ = _two_workers(tmp_path / "s.db")
    silent = first.ask()
    fail_dead_trials(first, grace_s=60)
    assert first.get_trials()[silent.number].state == optuna.trial.TrialState.RUNNING  # within the grace period
    time.sleep(0.2)
    fail_dead_trials(first, grace_s=0.1)
    assert first.get_trials()[silent.number].state == optuna.trial.TrialState.FAIL
    assert [t.system_attrs.get("failed_trial") for t in first.get_trials()][-1] == silent.number  # re-queued
