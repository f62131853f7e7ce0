from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from offline_search.tiny_llava import TinyLlavaSpec, make_tiny_llava

REPO = Path(__file__).resolve().parent.parent
ENGINE_SCRIPTS = Path(__file__).resolve().parent / "engine_scripts"


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory) -> Path:
    """The test kit's default tiny LLaVA, saved once per session (llava-hf layout)."""
    return make_tiny_llava(tmp_path_factory.mktemp("tiny-llava"), TinyLlavaSpec())


@pytest.fixture(scope="session")
def vllm_env(tmp_path_factory) -> dict[str, str]:
    """Environment for vLLM subprocesses: caches in a temporary folder, not ~/.cache/vllm."""
    return {
        **os.environ,
        "VLLM_CACHE_ROOT": str(tmp_path_factory.mktemp("vllm-cache")),
        "PYTHONUNBUFFERED": "1",
    }


def venv_bin(name: str) -> str:
    """A console script installed beside the running Python (`vllm`, `adaspkv`)."""
    return str(Path(sys.executable).with_name(name))
