"""The paper's layer-wise sparsity search: Optuna TPE over per-block sparsities.

Each trial samples one sparsity per block of layers from the grid S - 0.05 ... S + 0.05 (step 0.025),
centres them so the parameter-weighted mean is exactly S, masks the model in memory (no reload, no
re-calibration) and measures the objective. The study lives in an Optuna storage (SQLite in the
output folder by default), so a killed search resumes with the same command and keeps every finished
trial; several workers may share one PostgreSQL storage.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.study import MaxTrialsCallback
from optuna.trial import TrialState
from tqdm import tqdm

from offline_search.core.allocation import block_grid, centred_blocks, expand_blocks, layer_blocks
from offline_search.core.kv_plans import equal_split, fill_budget, fit_budget, mean_bits, uniform_bits_within
from offline_search.search.config import CompressConfig
from offline_search.search.workers import (TrialSeededTPE, claim_params, finished_plan, record_worker,
                                           wait_for_turn)
from vllm_adaspkv.errors import ConfigError

logger = logging.getLogger(__name__)
MAX_DUPLICATES = 50


def open_study(config: CompressConfig, model_sha256: str) -> optuna.Study:
    """Creates the study, or loads it after checking that it was started with the same settings."""
    Path(config.out).mkdir(parents=True, exist_ok=True)  # the default SQLite file lives there
    storage = _storage(config)
    name = config.default_study_name(model_sha256)
    # pareto: perplexity (or loss) against mean KV bits, both minimised
    directions = ["minimize", "minimize"] if config.kv_search == "pareto" else ["minimize"]
    study = optuna.create_study(storage=storage, study_name=name, directions=directions, load_if_exists=True)
    settings = config.search_settings(model_sha256)
    started = study.user_attrs.get("settings")
    if started is None:
        study.set_user_attr("settings", settings)
    elif started != settings:
        changed = sorted(k for k in settings.keys() | started.keys() if started.get(k) != settings.get(k))
        raise ConfigError(f"study {name!r} in {config.storage_url()} was started with other settings "
                         f"({', '.join(changed)}); use another --out, --storage or --study-name")
    study.sampler = TrialSeededTPE(config.seed, constant_liar=True)  # see workers.py
    return study


def _storage(config: CompressConfig, attempts: int = 5) -> RDBStorage:
    """Optuna's RDB storage with heartbeats: a worker that dies (SIGKILL, lost node) stops beating; its
    RUNNING trial is then failed and its parameters retried once by the next worker that starts a
    trial. Workers that start together on an empty database race to create its tables (PostgreSQL
    refuses the second CREATE): the loser tries again."""
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    for attempt in range(attempts):
        try:
            with warnings.catch_warnings():  # heartbeats are marked experimental; they are what we need
                warnings.simplefilter("ignore", ExperimentalWarning)
                return RDBStorage(config.storage_url(), heartbeat_interval=config.heartbeat_s,
                                  grace_period=3 * config.heartbeat_s,
                                  heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1))
        except (IntegrityError, ProgrammingError):
            if attempt == attempts - 1:
                raise
            time.sleep(0.5 * (attempt + 1))


def block_plan(config: CompressConfig, layer_weights: list[int]) -> tuple[list[range], list[float]]:
    """The blocks of layers and each block's parameter count (the centring weights)."""
    blocks = layer_blocks(len(layer_weights), config.blocks)
    return blocks, [sum(layer_weights[i] for i in layers) for layers in blocks]


def run_search(config: CompressConfig, model_sha256: str, layer_weights: list[int],
               evaluate_plan: Callable[[list[float] | None, list[int] | None], float],
               warm_start: list[float] | None, bare_eval_seconds: float) -> optuna.Study:
    """Runs trials until `config.trials` have completed. A trial samples per-block sparsities
    (allocation tpe) and/or per-layer KV bits (kv_search) and calls
    `evaluate_plan(per-layer sparsity or None, per-layer bits or None)` -> objective value."""
    num_layers = len(layer_weights)
    study = open_study(config, model_sha256)
    first: dict[str, int | float] = {}  # the uniform plan, the first trial of every new study
    if config.allocation == "tpe":
        grid = block_grid(config.sparsity, config.radius, config.step)
        blocks, weights = block_plan(config, layer_weights)
        # Integer offsets in grid steps (-2 ... 2 for the paper's grid): ordered for TPE, and exact
        # in the study database (no 0.39999999999999997).
        reach = (len(grid) - 1) // 2
        names = [f"block_{b}" for b in range(len(blocks))]
        first |= dict.fromkeys(names, 0)
    choices = config.kv_choices
    kv_names = [f"kv_{layer}" for layer in range(num_layers)]
    if config.kv_search == "split":
        first |= dict.fromkeys(kv_names, 0.5)
    elif config.kv_search in ("budget", "pareto"):
        first |= dict.fromkeys(kv_names, choices.index(uniform_bits_within(config.kv_bits_budget, choices)))
    study.enqueue_trial(first, skip_if_exists=True)
    if warm_start is not None:
        offsets = [round((value - config.sparsity) / config.step) for value in warm_start]
        study.enqueue_trial({**first, **dict(zip(names, offsets))}, skip_if_exists=True)

    duplicates = 0  # consecutive trials pruned for parameters already taken

    def objective(trial: optuna.Trial):
        nonlocal duplicates
        record_worker(trial)
        wait_for_turn(study, trial, config.trials, poll_s=min(1.0, config.heartbeat_s / 2),
                      grace_s=3 * config.heartbeat_s)
        layer_sparsity = bits = None
        if config.allocation == "tpe":
            sampled = [config.sparsity + config.step * trial.suggest_int(n, -reach, reach) for n in names]
            centred = centred_blocks(sampled, weights, config.sparsity)
            trial.set_user_attr("block_sparsity", centred)
            layer_sparsity = expand_blocks(centred, blocks)
        if config.kv_search == "split":
            bits = equal_split([trial.suggest_float(n, 0.0, 1.0) for n in kv_names])
        elif config.kv_search in ("budget", "pareto"):
            bits = [choices[trial.suggest_int(n, 0, len(choices) - 1)] for n in kv_names]
            if config.kv_bits_budget is not None:
                bits = fit_budget(bits, config.kv_bits_budget, choices)
            # Budget mode spends unused bits on the narrowest layers; a Pareto search keeps its
            # low-bit plans, which are the front's other end.
            if config.kv_search == "budget":
                bits = fill_budget(bits, config.kv_bits_budget, choices)
        if bits is not None:
            trial.set_user_attr("kv_bits", bits)
        try:
            claim_params(study, trial)
        except optuna.TrialPruned:
            duplicates += 1
            if duplicates >= MAX_DUPLICATES:  # a small grid can run out of parameters before N trials
                logger.warning("%d sampled parameter sets in a row were taken already: stopping this worker",
                               duplicates)
                study.stop()
            raise
        duplicates = 0
        same = finished_plan(study, trial, {"block_sparsity": [round(s, 9) for s in
                                                               trial.user_attrs.get("block_sparsity", [])],
                                            "kv_bits": bits})
        if same is not None:  # the objective is deterministic: the same plan, the same values
            trial.set_user_attr("same_plan_as", same.number)
            return tuple(same.values) if config.kv_search == "pareto" else same.value
        value = evaluate_plan(layer_sparsity, bits)
        return (value, mean_bits(bits)) if config.kv_search == "pareto" else value

    if config.show_progress:  # the bar shows each trial; Optuna's per-trial INFO lines would break it
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    done = completed_trials(study)
    if done >= config.trials:
        logger.info("study %r already has %d completed trials", study.study_name, done)
        return study
    bar = tqdm(total=config.trials, initial=done, desc="search", unit="trial", disable=not config.show_progress)
    durations: list[float] = []

    def progress(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.state == TrialState.COMPLETE:
            durations.append(trial.duration.total_seconds())
            bar.update(1)
            if len(trial.values) == 1:
                bar.set_postfix(best=f"{study.best_value:.4g}", last=f"{trial.value:.4g}")
            else:
                bar.set_postfix(pareto=len(study.best_trials), last=f"{trial.values[0]:.4g}@{trial.values[1]:.2f}b")

    start = time.perf_counter()
    try:
        # until the study (every worker's trials together) has config.trials completed: wait_for_turn stops
        # a trial that would be one too many, MaxTrialsCallback the worker whose trial was the last
        study.optimize(objective, n_trials=None,
                       callbacks=[progress, MaxTrialsCallback(config.trials, states=(TrialState.COMPLETE,))])
    finally:
        bar.close()
    if durations:
        mean = sum(durations) / len(durations)
        study.set_user_attr("timing", {"mean_trial_seconds": mean, "bare_eval_seconds": bare_eval_seconds,
                                        "ratio": mean / bare_eval_seconds, "trials_timed": len(durations),
                                        "wall_seconds": time.perf_counter() - start})
        print(f"mean trial time {mean:.2f} s = {mean / bare_eval_seconds:.2f} x one bare evaluation "
              f"({bare_eval_seconds:.2f} s), over {len(durations)} trials")
    return study


def completed_trials(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


def chosen_trial(study: optuna.Study, config: CompressConfig) -> optuna.trial.FrozenTrial:
    """The trial to export: the best one; for a Pareto search, the lowest objective among the
    Pareto-optimal trials within --kv-bits-budget (all of them without a budget)."""
    if config.kv_search != "pareto":
        return study.best_trial
    front = study.best_trials
    within = [t for t in front if config.kv_bits_budget is None or t.values[1] <= config.kv_bits_budget + 1e-9]
    if not within:
        raise ConfigError(f"no Pareto-optimal trial has a mean of at most {config.kv_bits_budget:g} KV bits")
    return min(within, key=lambda t: t.values[0])
