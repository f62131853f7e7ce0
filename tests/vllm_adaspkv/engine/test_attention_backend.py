"""Which implementation the quantized-KV attention backend calls, by the tensors' device."""

import inspect
import logging

import pytest

from vllm_adaspkv.engine import attention_backend
from vllm_adaspkv.kv import cpu_kernels, paged, triton_kernels


@pytest.fixture
def adaspkv_log():
    """The plugin's log records, at INFO, with kv_ops' once-per-choice cache cleared around the test."""
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("vllm.adaspkv")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    attention_backend.kv_ops.cache_clear()
    yield records
    attention_backend.kv_ops.cache_clear()
    logger.removeHandler(handler)
    logger.setLevel(old_level)


def test_kv_ops_by_device_logged_once(adaspkv_log):
    for _ in range(2):
        assert attention_backend.kv_ops(False) is cpu_kernels  # CPU: the C++ kernels
        assert attention_backend.kv_ops(True) is triton_kernels  # CUDA: the Triton kernels
    assert [r.getMessage() for r in adaspkv_log if "quantized KV cache on" in r.getMessage()] == [
        "adaspkv: quantized KV cache on CPU: C++ kernels (vllm_adaspkv.kv.cpu_kernels)",
        "adaspkv: quantized KV cache on CUDA: Triton kernels (vllm_adaspkv.kv.triton_kernels)"]


def test_cpu_kernels_that_cannot_be_built_fall_back_loudly(adaspkv_log, monkeypatch):
    def no_compiler():
        raise RuntimeError("Error building extension 'adaspkv_paged_kv_cpu_avx2': c++: not found\nmore")

    monkeypatch.setattr(cpu_kernels, "load", no_compiler)
    assert attention_backend.kv_ops(False) is paged
    (warning,) = [r for r in adaspkv_log if r.levelno == logging.WARNING]
    assert warning.getMessage() == (
        "adaspkv: the C++ CPU KV kernels could not be built (RuntimeError: Error building extension "
        "'adaspkv_paged_kv_cpu_avx2': c++: not found); the quantized KV cache runs on the PyTorch path "
        "(vllm_adaspkv.kv.paged), several times slower")


def test_kernels_take_the_reference_signatures():
    for module in (triton_kernels, cpu_kernels):
        for name in ("write", "attend"):
            assert inspect.signature(getattr(module, name)) == inspect.signature(getattr(paged, name))
