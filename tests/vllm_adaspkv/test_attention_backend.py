"""Which implementation the quantized-KV attention backend calls, by the tensors' device."""

import inspect
import logging

from vllm_adaspkv import attention_backend, kernels, paged_kv


def test_kv_ops_by_device_logged_once():
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("vllm.adaspkv")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    attention_backend.kv_ops.cache_clear()
    try:
        for _ in range(2):
            assert attention_backend.kv_ops(False) is paged_kv  # CPU: the PyTorch path
            assert attention_backend.kv_ops(True) is kernels  # CUDA: the Triton kernels
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    assert [r.getMessage() for r in records] == [
        "adaspkv: quantized KV cache on CPU: PyTorch path (vllm_adaspkv.paged_kv)",
        "adaspkv: quantized KV cache on CUDA: Triton kernels (vllm_adaspkv.kernels)"]


def test_kernels_take_the_reference_signatures():
    for name in ("write", "attend"):
        assert inspect.signature(getattr(kernels, name)) == inspect.signature(getattr(paged_kv, name))
