"""Several search workers on one study (Optuna's RDB storage: SQLite on one machine, PostgreSQL on many).

What Optuna gives and what this adds:
- Sampling: TPE with `constant_liar` (running trials count as bad, so concurrent workers spread out)
  and a random state seeded by the trial number (`TrialSeededTPE`): workers that start together do not
  replay the same start-up trials, as one sampler seeded per worker would, and a resumed study draws
  new ones.
- No parameters sampled twice (`claim_params`): a trial whose parameters another running or finished
  trial already has is pruned (not counted). A plan that a finished trial evaluated under other
  parameters is not evaluated again (`finished_plan`): the trial takes that trial's values (two
  running trials may still evaluate one plan at the same time).
- Exactly N completed trials (`wait_for_turn`): a trial starts only while the finished trials plus
  the running ones ahead of it are fewer than N; otherwise it waits, and gives way to a trial that
  Optuna's heartbeat re-queued after its worker died (RetryHeartbeatStaleTrialCallback).
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import time
import warnings

import numpy as np
import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.samplers import BaseSampler, TPESampler
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

ACTIVE = (TrialState.RUNNING, TrialState.COMPLETE)


def trial_seed(seed: int, trial_number: int) -> int:
    """The random seed of one trial of a study seeded `seed`: both numbers hashed together (numpy's
    SeedSequence). seed + trial number made study s + 1 replay study s's start-up trials one trial
    later, so that "three seeds" were one sequence of draws three times."""
    return int(np.random.SeedSequence([seed, trial_number]).generate_state(1)[0])


class TrialSeededTPE(BaseSampler):
    """Optuna's TPE sampler, its random state seeded from (seed, trial number), trial by trial."""

    def __init__(self, seed: int, **tpe_options):
        self._seed, self._options = seed, tpe_options
        self._current: tuple[int, TPESampler] | None = None

    def _tpe(self, trial: FrozenTrial) -> TPESampler:
        if self._current is None or self._current[0] != trial.number:  # TPE keeps no state but its RNG
            self._current = (trial.number, TPESampler(seed=trial_seed(self._seed, trial.number), **self._options))
        return self._current[1]

    def infer_relative_search_space(self, study, trial):
        return self._tpe(trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._tpe(trial).sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._tpe(trial).sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study, trial):
        self._tpe(trial).before_trial(study, trial)

    def after_trial(self, study, trial, state, values):
        self._tpe(trial).after_trial(study, trial, state, values)


def worker_record(trial_number: int, pid: int | None = None) -> dict:
    """Who runs a trial: host and process, and for which trial (a re-queued trial inherits the
    attributes of the one it repeats, so a record names the trial it was written for)."""
    return {"host": socket.gethostname(), "pid": os.getpid() if pid is None else pid, "trial": trial_number}


def record_worker(trial: optuna.Trial) -> None:
    """Records on the trial who runs it, in one write: a process killed between two writes would leave a
    half record, which reads as no record (and waits out the grace period instead of failing at once)."""
    trial.set_user_attr("worker", worker_record(trial.number))


def fail_dead_trials(study: optuna.Study, grace_s: float) -> None:
    """Fails, and re-queues once, running trials whose worker is gone where Optuna's heartbeat does not
    see it: a process on this host that is no longer alive (a search killed and run again: no need to
    wait out the grace period), and a trial whose worker died before it recorded itself or beat once
    (Optuna's stale-trial check knows only trials that have beaten; such a trial would block the study)."""
    host, now = socket.gethostname(), datetime.datetime.now()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        record = trial.user_attrs.get("worker")
        recorded = isinstance(record, dict) and record.get("trial") == trial.number  # not one inherited
        gone = record["host"] == host and not _alive(int(record["pid"])) if recorded else \
            (now - trial.datetime_start).total_seconds() > grace_s
        if gone:
            study.tell(trial.number, state=TrialState.FAIL)
            RetryHeartbeatStaleTrialCallback(max_retry=1)(study, study.get_trials(deepcopy=False)[trial.number])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def wait_for_turn(study: optuna.Study, trial: optuna.Trial, n_trials: int, poll_s: float, grace_s: float) -> None:
    """Returns when `trial` may run; raises TrialPruned (and stops this worker's loop) when the study
    has its N completed trials, or to give way to a trial re-queued after its worker died."""
    while True:
        with warnings.catch_warnings():  # marked experimental, like the heartbeat it serves
            warnings.simplefilter("ignore", ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)  # a dead worker's trial fails here, and is re-queued
        fail_dead_trials(study, grace_s)
        trials = study.get_trials(deepcopy=False)
        complete = sum(t.state == TrialState.COMPLETE for t in trials)
        if complete >= n_trials:
            study.stop()
            raise optuna.TrialPruned(f"the study has its {n_trials} completed trials")
        if any(t.state == TrialState.WAITING and "failed_trial" in t.system_attrs for t in trials):
            raise optuna.TrialPruned("a re-queued trial runs first")  # this worker takes it next
        ahead = sum(t.state == TrialState.RUNNING and t.number < trial.number for t in trials)
        if complete + ahead < n_trials:
            return
        time.sleep(poll_s)  # the trials ahead may finish (then the study is done) or die (then re-run)


def claim_params(study: optuna.Study, trial: optuna.Trial) -> None:
    """Prunes the trial if another running or finished trial has its parameters. Two trials that draw
    the same parameters at once may both be pruned; never both run."""
    key = json.dumps(trial.params, sort_keys=True)
    for other in study.get_trials(deepcopy=False, states=ACTIVE):
        if other.number != trial.number and json.dumps(other.params, sort_keys=True) == key:
            raise optuna.TrialPruned(f"the same parameters as trial {other.number}")


def finished_plan(study: optuna.Study, trial: optuna.Trial, plan: dict) -> FrozenTrial | None:
    """Records the trial's plan; a finished trial with the same plan (other parameters can give the same
    plan: block sparsities are centred), whose values this trial may take instead of evaluating again."""
    key = json.dumps(plan, sort_keys=True)
    trial.set_user_attr("plan", key)
    return next((other for other in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                 if other.user_attrs.get("plan") == key), None)
