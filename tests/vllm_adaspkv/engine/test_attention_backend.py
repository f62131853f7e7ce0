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


def test_the_fp8_tier_is_refused_on_a_gpu_at_start_up(monkeypatch):
    """The Triton kernels store 8 bits as int8 codes only: an fp8 layer must stop the engine, not be served
    with the wrong bytes."""
    monkeypatch.setattr(attention_backend.current_platform, "is_cpu", lambda: False)
    layer = {"num_heads": 4, "head_size": 64, "scale": 0.125, "num_kv_heads": 2}
    attention_backend.backend_for(paged.KVFormat(8, 64, 32)).get_impl_cls()(**layer)  # int8: builds
    fp8 = attention_backend.backend_for(paged.KVFormat(8, 64, 32, fp8=True))
    assert fp8.get_name() == "CUSTOM" and "fp8_d64" in fp8.__name__
    with pytest.raises(ValueError, match=r"^adaspkv: the fp8 KV tier \(kv_quant.eight_bit fp8_e4m3\) has C\+\+ CPU "
                                         r"kernels only; .* re-export with --kv-eight-bit int8 to serve on a GPU$"):
        fp8.get_impl_cls()(**layer)
    with pytest.raises(ValueError, match=r"^the Triton KV kernels have no float8 e4m3 rows"):
        from vllm_adaspkv.kv.triton_kernels._host import layout_constants

        layout_constants(paged.KVFormat(8, 64, 32, fp8=True))
