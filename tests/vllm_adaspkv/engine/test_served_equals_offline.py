"""A 50%-sparse artifact with a 4-bit KV cache, served by `vllm serve ART --plugin adaspkv` (float32), gives
the answers and the prompt log-probabilities that `adaspkv eval --artifact` computes offline with the
simulated cache: what the search measured is what is served."""

import pytest

from offline_search.data.bundled_models import resolve_model
from offline_search.evaluation.harness import EvalConfig, evaluate
from offline_search.evaluation.vllm_server import ServerConfig, VllmServer
from tests.vllm_adaspkv.artifacts import make_artifact

pytestmark = pytest.mark.slow
LIMIT = 48  # ShapesVQA questions and WikiText-2 windows


def test_served_answers_and_logprobs_equal_offline(tmp_path, vllm_env):
    model_dir = resolve_model("shapes-llava")
    artifact = make_artifact(tmp_path / "art", model_dir, [4, 4, 4, 4], sparsity=0.5)
    offline = evaluate(EvalConfig(model="shapes-llava", artifact=str(artifact), limit=LIMIT, batch_size=16), model_dir)
    context = offline["wikitext2_seq_len"]  # a prompt-logprob request over a full window generates one token
    config = ServerConfig(model=str(artifact), log_file=tmp_path / "serve.log", startup_timeout_s=600,
                          env={**vllm_env, "VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1"},
                          extra_args=("--plugin", "adaspkv", "--dtype", "float32", "--kv-cache-memory-bytes",
                                      str(64 << 20), "--max-model-len", str(context + 1)))
    with VllmServer(config) as server:
        served = evaluate(EvalConfig(model="shapes-llava", server=server.base_url, limit=LIMIT), model_dir)
    log = config.log_file.read_text()
    assert "quantized KV cache on CPU: C++ kernels" in log  # the plugin's cache, not vLLM's
    assert served["shapesvqa_predictions"] == offline["shapesvqa_predictions"]
    # the same windows, scored token by token: log-probabilities equal to float32 rounding
    assert served["wikitext2_windows"] == offline["wikitext2_windows"] == LIMIT
    assert served["wikitext2_ppl"] == pytest.approx(offline["wikitext2_ppl"], rel=1e-4)
    assert offline["wikitext2_ppl"] != pytest.approx(evaluate(  # and the artifact is not the dense model
        EvalConfig(model="shapes-llava", tasks=("wikitext2",), limit=LIMIT), model_dir)["wikitext2_ppl"], rel=1e-3)
