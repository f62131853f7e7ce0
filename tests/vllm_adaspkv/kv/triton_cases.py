"""The KV kernel cases (kernel_cases.py) for the Triton kernels (vllm_adaspkv.kv.triton_kernels).

Run by test_triton_kernels.py in a fresh process: with TRITON_INTERPRET=1 on a machine without CUDA
(Triton decides interpreter or compiler when a module's @triton.jit runs, triton.language's own
helpers included, so the variable must be set before triton is first imported), plainly on CUDA.
By hand: `TRITON_INTERPRET=1 python -m pytest tests/vllm_adaspkv/kv/triton_cases.py`.
"""

from __future__ import annotations

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("the Triton kernels need CUDA or TRITON_INTERPRET=1 set before Python starts",
                allow_module_level=True)

from tests.vllm_adaspkv.kv.kernel_cases import (  # noqa: E402,F401  (the tests)
    test_attend_matches_paged_kv_attend,
    test_nothing_to_do,
    test_write_is_byte_for_byte_paged_kv_write,
    test_write_then_attend_round_trip,
)
from vllm_adaspkv.kv import triton_kernels  # noqa: E402  (after the check: importing decorates the kernels)


@pytest.fixture
def ops():
    return triton_kernels


@pytest.fixture
def device():
    return "cuda" if CUDA else "cpu"
