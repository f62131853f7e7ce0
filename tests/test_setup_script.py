"""scripts/setup_venv.sh refuses bad settings before it touches anything."""

import os
import subprocess

from tests.conftest import REPO

SCRIPT = REPO / "scripts" / "setup_venv.sh"


def _run(tmp_path, **env):
    venv = tmp_path / "venv"
    out = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "VENV": str(venv), **env})
    return out, venv


def test_unknown_target_is_rejected(tmp_path):
    out, venv = _run(tmp_path, ADASPKV_TARGET="tpu")
    assert out.returncode == 2
    assert "ADASPKV_TARGET=tpu is not one of auto, cpu, cuda" in out.stderr
    assert not venv.exists()


def test_wrong_python_is_rejected(tmp_path):
    fake = tmp_path / "python-old"
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    out, venv = _run(tmp_path, ADASPKV_TARGET="cpu", PYTHON=str(fake))
    assert out.returncode == 2
    assert "needs Python 3.11 or 3.12" in out.stderr
    assert not venv.exists()
