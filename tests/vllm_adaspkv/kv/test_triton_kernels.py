"""The Triton KV kernels: correctness against kv.paged, and the compiled (CUDA) path's build.

The correctness cases live in triton_cases.py and run in a fresh pytest process: on a machine
without CUDA with TRITON_INTERPRET=1 set from the start. Triton fixes interpreter or compiler mode
when @triton.jit decorates, triton.language's own jit helpers (tl.sum, tl.cdiv) included, i.e.
when triton is first imported; inside this session something may already have imported it, and
setting the variable here would leak into the vLLM processes other tests start. A fresh process
is independent of both. With CUDA the same cases run compiled.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vllm_adaspkv.kv.paged import KVFormat

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[3]
CASES = Path(__file__).with_name("triton_cases.py")


def test_kernels_match_the_pytorch_reference():
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if torch.cuda.is_available():
        env.pop("TRITON_INTERPRET", None)
    else:
        env["TRITON_INTERPRET"] = "1"
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs", str(CASES)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=850)
    print(run.stdout[-20000:], run.stderr[-5000:])
    assert run.returncode == 0, f"kernel cases failed:\n{run.stdout[-8000:]}\n{run.stderr[-3000:]}"
    assert " passed" in run.stdout and "skipped" not in run.stdout


@pytest.mark.parametrize(("fmt", "qpk"), [*((KVFormat(bits, 128, 32), 4) for bits in (16, 8, 6, 4, 2)),
                                          (KVFormat(6, 96, 48), 3), (KVFormat(4, 128, 64), 1)],
                         ids=lambda x: str(x.bits) + "bit" if isinstance(x, KVFormat) else f"gqa{x}")
def test_kernels_compile_for_cuda(fmt, qpk):
    """Without a GPU: each format's kernels go through Triton's NVIDIA compiler down to sm_90 machine
    code (the interpreter accepts code the compiler rejects), and the write kernel divides with
    IEEE rounding (div.rn, as torch does; Triton's `/` is approximate), which its exact bytes need."""
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource, compile
        from triton.runtime.jit import JITFunction
    except ImportError as e:
        pytest.skip(f"Triton without its NVIDIA compiler: {e}")
    from vllm_adaspkv.kv.triton_kernels import cache_write, paged_attention
    from vllm_adaspkv.kv.triton_kernels._host import layout_constants

    if not isinstance(cache_write._write_kernel, JITFunction):
        pytest.skip("kernels imported under TRITON_INTERPRET=1: nothing to compile")

    def build(kernel, constants):
        types = {"cache_ptr": "*u8", "key_ptr": "*bf16", "value_ptr": "*bf16", "slot_ptr": "*i64",
                 "out_ptr": "*bf16", "q_ptr": "*bf16", "block_table_ptr": "*i32", "seq_lens_ptr": "*i32",
                 "qsl_ptr": "*i32", "qk_scale": "fp32"}  # the rest are integer strides and counts
        constants = {k: v for k, v in constants.items() if k in kernel.arg_names}
        signature = {name: "constexpr" if name in constants else types.get(name, "i32")
                     for name in kernel.arg_names}
        return compile(ASTSource(kernel, signature, constants), target=GPUTarget("cuda", 90, 32))

    c = dict(BLOCK_SIZE=16, **layout_constants(fmt))
    write = build(cache_write._write_kernel, c)
    assert write.asm["cubin"]
    if fmt.bits != 16:
        assert "div.rn.f32" in write.asm["ptx"] and "div.full" not in write.asm["ptx"]
    attend = build(paged_attention._attend_kernel, dict(c, QPK=qpk, QPK_P=1 << (qpk - 1).bit_length()))
    assert attend.asm["cubin"]
