"""Artifacts served through vLLM's engine (`LLM(model=ART_DIR)`), each engine in a fresh process, on
the bundled shapes-llava: identity and 8-bit artifacts against stock vLLM, KV capacity against the
byte formula, and the served weights' zeros against the masks."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from offline_search.data import shapes_vqa
from offline_search.data.bundled_models import resolve_model
from offline_search.data.text_data import read_lines, wikitext_path
from tests.conftest import ENGINE_SCRIPTS
from tests.vllm_adaspkv.artifacts import make_artifact
from vllm_adaspkv.format import LINEARS, mask_key, read_masks
from vllm_adaspkv.kv.paged import KVFormat

pytestmark = pytest.mark.slow

BUDGET = 32 << 20
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def shapes_dir():
    return resolve_model("shapes-llava")


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    """64 prompts: 32 ShapesVQA test images with their questions, 32 WikiText-2 test lines."""
    folder = tmp_path_factory.mktemp("prompts")
    out = []
    for sample in shapes_vqa.samples("test", 32):
        path = folder / f"{len(out)}.png"
        sample.image.save(path)
        # shapes-llava's chat template puts the question before the image.
        out.append({"prompt": f"USER: {sample.question}\n<image> ASSISTANT:", "image": str(path)})
    lines = [line for line in read_lines(wikitext_path("test")) if len(line) > 80][:32]
    out += [{"prompt": line[:160], "image": None} for line in lines]
    assert len(out) == 64
    return out


def run_llm(tmp_path, env, model, prompts, **config):
    cfg = tmp_path / f"config-{len(list(tmp_path.iterdir()))}.json"
    out = cfg.with_suffix(".out.json")
    cfg.write_text(json.dumps({"model": str(model), "prompts": prompts, "max_tokens": MAX_TOKENS,
                               "kv_cache_memory_bytes": BUDGET, **config}))
    run = subprocess.run([sys.executable, str(ENGINE_SCRIPTS / "llm_artifact.py"), str(cfg), str(out)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return json.loads(out.read_text()), run.stdout + run.stderr


@pytest.fixture(scope="module")
def stock(tmp_path_factory, vllm_env, shapes_dir, prompts):
    return run_llm(tmp_path_factory.mktemp("stock"), vllm_env, shapes_dir, prompts)[0]


def test_identity_artifact_gives_stock_tokens(tmp_path, vllm_env, shapes_dir, prompts, stock):
    art = make_artifact(tmp_path / "identity", shapes_dir, [16] * 4)
    served, log = run_llm(tmp_path, vllm_env, art, prompts)
    assert "adaspkv: serving" in log  # through the plugin, not a silent stock run
    assert served["tokens"] == stock["tokens"]


@pytest.mark.parametrize("eight_bit", ["int8", "fp8_e4m3"])
def test_eight_bit_artifact_agrees_with_stock(tmp_path, vllm_env, shapes_dir, prompts, stock, eight_bit):
    """int8 codes (a scale pair per 32 values) and the fp8 tier (float8 e4m3 values, no scales)."""
    art = make_artifact(tmp_path / "kv8", shapes_dir, [8] * 4, eight_bit=eight_bit)
    served, log = run_llm(tmp_path, vllm_env, art, prompts)
    same = sum(a == b for a, b in zip(served["tokens"], stock["tokens"]))
    print(f"8-bit KV ({eight_bit}): {same}/64 prompts with stock vLLM's greedy tokens")
    assert same >= 61  # >= 95% of 64
    assert served["num_blocks"] > stock["num_blocks"]  # the quantized cache holds more
    if eight_bit == "fp8_e4m3":  # one byte a value, as vLLM's fp8 cache: 2 KV heads x (K + V) x 32 bytes a layer
        per_token = 4 * 2 * KVFormat(8, 32, 32, fp8=True).token_head_bytes
        assert per_token == 4 * 2 * 2 * 32 and served["num_blocks"] == BUDGET // (served["block_size"] * per_token)
        assert "    0     fp8         128" in log


def test_mixed_six_bit_capacity_and_served_zeros(tmp_path, vllm_env, shapes_dir, prompts):
    """Mean 6 bits (8/4/8/4, one scale pair per head row) under the same budget as a bf16 cache:
    the block count is the byte formula's, and >= 2.2x the 16-bit one (head_dim 32: a row is 32
    bf16 values, 64 bytes, against 36 at 8 bits and 20 at 4, the fp16 scale and zero included)."""
    head_dim = json.loads((shapes_dir / "config.json").read_text())["text_config"]["head_dim"]
    bits = [8, 4, 8, 4]
    art = make_artifact(tmp_path / "mixed", shapes_dir, bits, sparsity=0.5, group=head_dim)
    dense, _ = run_llm(tmp_path, vllm_env, shapes_dir, prompts[:2], dtype="bfloat16")
    # Chunked prefill in 96-token steps and a prefix shared by the repeated prompts exercise the
    # cache across steps; several requests run at once.
    served, log = run_llm(tmp_path, vllm_env, art, prompts[:8] + prompts[:8], dtype="bfloat16", zeros=True,
                          engine={"max_num_batched_tokens": 96, "enable_prefix_caching": True})
    block = served["block_size"]
    per_token = sum(2 * KVFormat(b, head_dim, head_dim).token_head_bytes for b in bits)  # 2 KV heads per layer
    assert served["num_blocks"] == BUDGET // (block * per_token)
    assert dense["num_blocks"] == BUDGET // (block * 4 * 2 * 2 * head_dim * 2)
    ratio = served["num_blocks"] / dense["num_blocks"]
    print(f"KV tokens at mean 6 bits: {served['num_blocks'] * block} vs bf16 {dense['num_blocks'] * block} "
          f"({ratio:.2f}x)")
    assert ratio >= 2.2
    assert served["tokens"][:8] == served["tokens"][8:]  # prefix-cache hits decode as the first pass did

    masks = read_masks(art)
    fused = {"qkv_proj": LINEARS[:3], "o_proj": LINEARS[3:4], "gate_up_proj": LINEARS[4:6],
             "down_proj": LINEARS[6:]}
    for i in range(4):
        for name, parts in fused.items():
            got = served["zeros"][f"{i}.{name}"]
            zeros = np.unpackbits(np.array(got["bits"], dtype=np.uint8))[: np.prod(got["shape"])]
            expected = ~torch.cat([masks[mask_key(i, part)] for part in parts]).numpy()
            assert np.array_equal(zeros.reshape(got["shape"]).astype(bool), expected), (i, name)


def test_tensor_parallel_two_gives_the_same_tokens(tmp_path, vllm_env, shapes_dir, prompts):
    """A masked, mixed-KV artifact at TP 1 and TP 2 (vLLM's CPU backend: two worker processes, one KV head
    of two each, threads bound one core each since the machine has one NUMA node)."""
    import re

    art = make_artifact(tmp_path / "mixed", shapes_dir, [8, 4, 6, 16], sparsity=0.5)
    one, _ = run_llm(tmp_path, vllm_env, art, prompts[:16])
    two, log = run_llm(tmp_path, {**vllm_env, "VLLM_CPU_OMP_THREADS_BIND": "0|1"}, art, prompts[:16],
                       engine={"tensor_parallel_size": 2})
    assert "Worker_TP1" in log and "1 of 2 KV heads on each of 2 ranks" in log
    assert two["tokens"] == one["tokens"]
    # each rank holds half the heads in its budget: twice the tokens, as the start-up table says
    assert two["num_blocks"] == 2 * one["num_blocks"]
    table = int(re.search(r"KV budget \d+ bytes: (\d+) tokens", log)[1])
    vllm_says = int(re.search(r"KV cache size: ([\d,]+) tokens", log)[1].replace(",", ""))
    assert table == vllm_says == two["num_blocks"] * two["block_size"]
