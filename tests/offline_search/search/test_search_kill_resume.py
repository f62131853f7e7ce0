"""SIGKILL a running `adaspkv search` and run the same command again (fresh processes)."""

import signal
import sqlite3
import subprocess
import time

import pytest

from tests.conftest import venv_bin


def running_recorded(db) -> bool:
    """Whether a trial runs whose worker has recorded itself (user attribute 'worker' written)."""
    with sqlite3.connect(db) as connection:
        try:
            return bool(connection.execute(
                "SELECT 1 FROM trials t JOIN trial_user_attributes a ON a.trial_id = t.trial_id "
                "WHERE t.state = 'RUNNING' AND a.key = 'worker'").fetchall())
        except sqlite3.OperationalError:
            return False


def completed(db) -> list[tuple]:
    if not db.is_file():
        return []
    with sqlite3.connect(db) as connection:
        try:
            return connection.execute(
                "SELECT t.number, v.value FROM trials t JOIN trial_values v ON v.trial_id = t.trial_id "
                "WHERE t.state = 'COMPLETE' ORDER BY t.number").fetchall()
        except sqlite3.OperationalError:  # tables not created yet
            return []


@pytest.mark.slow
def test_killed_search_resumes_and_keeps_finished_trials(tiny_llava_dir, tmp_path):
    out = tmp_path / "art"
    command = [venv_bin("adaspkv"), "search", "--model", str(tiny_llava_dir), "--out", str(out),
               "--cache-dir", str(tmp_path / "cache"), "--metric", "lognorm", "--sparsity", "0.5",
               "--trials", "12", "--blocks", "2", "--calibration-windows", "2", "--calibration-samples", "2",
               "--objective-windows", "48", "--objective-samples", "2"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    db = out / "study.db"
    deadline = time.monotonic() + 300
    # killed in a trial that recorded its worker: a trial killed before that is failed only after the
    # heartbeat grace (tests/offline_search/search/test_workers.py), which this test does not wait out
    while len(completed(db)) < 3 or not running_recorded(db):
        assert process.poll() is None, "the search ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    before = completed(db)
    assert 3 <= len(before) < 12 and not (out / "adaspkv.json").exists()
    with sqlite3.connect(db) as connection:
        last_before_kill = connection.execute("SELECT MAX(number) FROM trials").fetchone()[0]

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    after = completed(db)
    assert len(after) == 12
    assert after[:len(before)] == before  # finished trials kept, values unchanged
    assert "reused from" in rerun.stdout  # no second calibration either
    assert (out / "adaspkv.json").is_file()
    with sqlite3.connect(db) as connection:
        states = dict(connection.execute("SELECT state, COUNT(*) FROM trials GROUP BY state").fetchall())
        failed_at = connection.execute("SELECT datetime_complete FROM trials WHERE state = 'FAIL'").fetchall()
        rerun_finishes = connection.execute(
            "SELECT MIN(datetime_complete) FROM trials WHERE state = 'COMPLETE' AND number > ?",
            (last_before_kill,)).fetchone()[0]
    assert len(failed_at) <= 1 and "RUNNING" not in states
    # a trial the kill interrupted was failed (and re-queued) before the rerun finished any trial of its own:
    # at once, not after its 90 s heartbeat grace, during which the rerun's new trials would have run
    assert all(when < rerun_finishes for (when,) in failed_at)
