"""A plan with weight_format "packed" served through the OpenAI API: the language model's pruned linears,
stored packed in the artifact (bitmask + kept values), kept so in memory and run by the C++ kernel, give
the tokens of the same pruning served masked-dense, and the log says which linears are packed and what
they take."""

from __future__ import annotations

import logging

import pytest
from openai import OpenAI

from offline_search.evaluation.openai_chat import image_data_url, image_message
from offline_search.evaluation.vllm_server import ServerConfig, VllmServer
from tests.vllm_adaspkv.artifacts import make_artifact, num_layers
from vllm_adaspkv.engine.packed_linears import PACK_MIN_SPARSITY, packed_modules
from vllm_adaspkv.format import MASK_FILE, PACKED_FILE, read_plan

PROMPTS = ("The capital of France is", "Once upon a time", "1, 2, 3, 4,")


def served_answers(artifact, env, log, red_square, eager: bool = False) -> tuple[list, list]:
    config = ServerConfig(model=str(artifact), log_file=log, env=env, startup_timeout_s=600,
                          extra_args=("--plugin", "adaspkv", "--kv-cache-memory-bytes", str(32 << 20),
                                      "--dtype", "float32", "--max-model-len", "256",
                                      *(("--enforce-eager",) if eager else ())))
    with VllmServer(config) as server:
        client = OpenAI(base_url=f"{server.base_url}/v1", api_key="EMPTY")
        texts = [client.completions.create(model=str(artifact), prompt=p, max_tokens=8, temperature=0.0,
                                           logprobs=1) for p in PROMPTS]
        chat = client.chat.completions.create(
            model=str(artifact), messages=[image_message("What colour?", image_data_url(red_square))],
            max_tokens=8, temperature=0.0)
    tokens = [t.choices[0].logprobs.tokens for t in texts] + [chat.choices[0].message.content]
    logprobs = [t.choices[0].logprobs.token_logprobs for t in texts]
    return tokens, logprobs


@pytest.mark.slow
def test_packed_linears_serve_the_tokens_of_masked_dense(tmp_path, tiny_llava_dir, vllm_env, red_square):
    bits = [16] * num_layers(tiny_llava_dir)
    masked = make_artifact(tmp_path / "masked", tiny_llava_dir, bits, sparsity=0.5)
    packed = make_artifact(tmp_path / "packed", tiny_llava_dir, bits, sparsity=0.5, weight_format="packed",
                           packed_weights=True)
    assert (packed / PACKED_FILE).is_file() and not (packed / MASK_FILE).exists()
    # the reference eager (masked weights under torch.compile are the shapes-llava served test's); packed compiled
    masked_tokens, masked_logprobs = served_answers(masked, vllm_env, tmp_path / "masked.log", red_square, eager=True)
    packed_tokens, packed_logprobs = served_answers(packed, vllm_env, tmp_path / "packed.log", red_square)
    assert packed_tokens == masked_tokens
    for a, b in zip(packed_logprobs, masked_logprobs):
        assert a == pytest.approx(b, abs=1e-4)
    log = (tmp_path / "packed.log").read_text()
    assert "packed sparse linears (C++ kernel" in log
    assert log.count("qkv_proj, o_proj, gate_up_proj, down_proj") == len(bits)
    assert "packed sparse linears" not in (tmp_path / "masked.log").read_text()


def test_which_modules_are_packed(tmp_path, tiny_llava_dir, caplog):
    bits = [16] * num_layers(tiny_llava_dir)
    plan = read_plan(make_artifact(tmp_path / "a", tiny_llava_dir, bits, sparsity=0.5, weight_format="packed"))
    modules = packed_modules(plan, "cpu", 1)
    assert modules["language_model.model.layers.0.self_attn.qkv_proj"] == tuple(
        f"language_model.model.layers.0.self_attn.{p}_proj.weight" for p in "qkv")
    assert len(modules) == 4 * len(bits)
    sparse = plan.model_copy(update={"layers": tuple(
        layer.model_copy(update={"sparsity": {**layer.sparsity, "self_attn.k_proj": PACK_MIN_SPARSITY / 2}})
        for layer in plan.layers)})
    assert not any(name.endswith("qkv_proj") for name in packed_modules(sparse, "cpu", 1))  # one member too dense
    with caplog.at_level(logging.WARNING, logger="vllm.adaspkv"):
        assert packed_modules(plan, "cpu", 2) == {} and packed_modules(plan, "cuda", 1) == {}
        assert packed_modules(plan, "cpu", 1, pipeline_parallel=2) == {}
    assert caplog.text.count("serving MASKED DENSE weights instead") == 3
    masked = read_plan(make_artifact(tmp_path / "b", tiny_llava_dir, bits, sparsity=0.5))
    assert packed_modules(masked, "cpu", 1) == {}
