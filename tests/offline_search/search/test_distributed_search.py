"""Three search workers on one study in a real PostgreSQL server (started here, on loopback), one of them
SIGKILLed in the middle of a trial: the study ends with exactly N completed trials and no parameters
drawn twice, the killed trial is failed by the heartbeat and run again once, and only the worker
started without --worker writes the artifact."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from glob import glob
from pathlib import Path

import optuna
import pytest

import vllm_adaspkv.format as art
from offline_search.evaluation.vllm_server import free_port
from tests.conftest import venv_bin

pytestmark = pytest.mark.slow
TRIALS = 8


def _postgres_bin() -> Path:
    found = shutil.which("initdb") or next(iter(sorted(glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)), None)
    if found is None:
        pytest.fail("no PostgreSQL server (initdb): scripts/setup_venv.sh installs Debian's postgresql as root")
    return Path(found).resolve().parent


@pytest.fixture
def postgres_url():
    """A throw-away PostgreSQL cluster on 127.0.0.1, run as the postgres user when the tests run as root
    (the server refuses root)."""
    bin_dir = _postgres_bin()
    root = Path(tempfile.mkdtemp(prefix="adaspkv-pg-"))
    as_user = []
    if os.geteuid() == 0:
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(root, "postgres")
    root.chmod(0o755)
    data, port = root / "data", free_port()
    run = lambda *cmd: subprocess.run([*as_user, *map(str, cmd)], check=True, capture_output=True, text=True,
                                      timeout=120)
    run(bin_dir / "initdb", "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8")
    run(bin_dir / "pg_ctl", "-D", data, "-l", root / "server.log", "-w", "-o",
        f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "start")
    try:
        run(bin_dir / "createdb", "-h", "127.0.0.1", "-p", port, "-U", "postgres", "adaspkv")
        yield f"postgresql://postgres@127.0.0.1:{port}/adaspkv"
    finally:
        subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"],
                       capture_output=True, timeout=120)
        shutil.rmtree(root, ignore_errors=True)


def test_three_workers_one_killed(tiny_llava_dir, tmp_path, postgres_url):
    out = tmp_path / "art"
    command = [venv_bin("adaspkv"), "search", "--model", str(tiny_llava_dir), "--out", str(out),
               "--cache-dir", str(tmp_path / "cache"), "--storage", postgres_url, "--metric", "wanda",
               "--sparsity", "0.5", "--trials", str(TRIALS), "--heartbeat-interval", "1",
               "--calibration-windows", "2", "--calibration-samples", "2",
               "--objective-windows", "200"]  # trials of a second or two: long enough to be killed in one
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    logs = [open(tmp_path / f"worker{i}.log", "w") for i in range(3)]
    exporter = subprocess.Popen(command, stdout=logs[0], stderr=subprocess.STDOUT, env=env)
    workers = [subprocess.Popen([*command, "--worker"], stdout=log, stderr=subprocess.STDOUT, env=env)
               for log in logs[1:]]
    victim = workers[1]
    try:
        killed = _kill_in_a_trial(victim, postgres_url)
        assert victim.wait(timeout=60) == -signal.SIGKILL
        for process in (exporter, workers[0]):
            assert process.wait(timeout=900) == 0, (tmp_path / "worker0.log").read_text()[-3000:]
    finally:
        for process in (exporter, *workers):
            process.kill()
        for log in logs:
            log.close()

    name = art.read_plan(out).provenance.study_name
    trials = optuna.load_study(study_name=name, storage=postgres_url).get_trials()
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == TRIALS  # exactly N, from three workers
    assert len({json.dumps(t.params, sort_keys=True) for t in complete}) == TRIALS  # no parameters twice
    killed_trial = next(t for t in trials if t.number == killed)
    assert killed_trial.state == optuna.trial.TrialState.FAIL  # failed by the heartbeat
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed]
    assert len(retries) == 1 and retries[0].state == optuna.trial.TrialState.COMPLETE  # run again, once
    assert retries[0].params == killed_trial.params
    assert {t.user_attrs["worker"]["pid"] for t in complete} >= {exporter.pid, workers[0].pid}
    # the artifact is written once, by the worker started without --worker, from the finished study
    printed = [(tmp_path / f"worker{i}.log").read_text() for i in range(3)]
    assert printed[0].count("artifact written to") == 1
    assert all("artifact written to" not in text for text in printed[1:])
    assert "worker done" in printed[1]
    assert art.read_plan(out).provenance.trials_completed == TRIALS


def _kill_in_a_trial(victim: subprocess.Popen, url: str, timeout_s: float = 600) -> int:
    """SIGKILLs `victim` while one of its trials runs; returns that trial's number. One storage for all
    the polls (a storage per poll leaked its connection pool: under load the server ran out of clients)."""
    deadline = time.monotonic() + timeout_s
    storage = None
    try:
        while time.monotonic() < deadline:
            assert victim.poll() is None, "the worker to kill ended by itself"
            storage = storage or _storage_once_created(url)
            for summary in optuna.get_all_study_summaries(storage) if storage else []:
                for trial in optuna.load_study(study_name=summary.study_name, storage=storage).get_trials(
                        deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
                    if trial.user_attrs.get("worker", {}).get("pid") == victim.pid and "plan" in trial.user_attrs:
                        victim.send_signal(signal.SIGKILL)
                        return trial.number
            time.sleep(0.1)
    finally:
        if storage is not None:
            storage.engine.dispose()
    raise AssertionError("the worker to kill never ran a trial")


def _storage_once_created(url: str):
    """The workers' storage once they have created its tables (None before: the test must not create
    them, the workers' race on an empty database is part of what is tested)."""
    storage = None
    try:
        storage = optuna.storages.RDBStorage(url, skip_table_creation=True)  # checks the schema version
        optuna.get_all_study_summaries(storage)
        return storage
    except Exception:  # tables not there yet, or half created by a worker: try again in a moment
        if storage is not None:
            storage.engine.dispose()
        return None
