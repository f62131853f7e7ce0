"""A sparse artifact with a quantized KV cache (shapes-llava: 50%, 4 bits), served by
`vllm serve ART --plugin adaspkv` (float32), gives the answers and the prompt log-probabilities that
`adaspkv eval --artifact` computes offline with the simulated cache: what the search measured is what is
served."""

import pytest

from offline_search.data.bundled_models import resolve_model
from offline_search.evaluation.harness import EvalConfig, evaluate
from offline_search.evaluation.vllm_server import ServerConfig, VllmServer
from tests.conftest import REPO
from tests.vllm_adaspkv.artifacts import make_artifact
from vllm_adaspkv.format import read_geometry

pytestmark = pytest.mark.slow
LIMIT = {"shapes-llava": 48, "smol-llava": 16}  # ShapesVQA questions and WikiText-2 windows


@pytest.mark.parametrize("oracle", ["shapes-llava", "smol-llava"])
def test_served_answers_and_logprobs_equal_offline(oracle, tmp_path, vllm_env, request):
    # smol-llava: SmolLM2's real activations (residuals in the tens of thousands), windows of 256 of its 8192,
    # 10% magnitude (at 20% and more it answers in sentences) and an 8-bit cache: perplexity agrees to 3e-5,
    # and greedy answers agree except near ties (16 of 16 alone; 15 of 16, 'green' for 'blue', in a full-suite
    # run where an earlier test had left torch at one thread, since fixed). Not tested at 4 bits, measured
    # 2026-12-07: served perplexity 0.5 % above the simulation's (37.107 against 36.916), 10 of 16 answers
    # the same. Not found to be a serving error: float32 rounding (3e-7 at layer 0) flips a few 4-bit codes
    # and the flips grow layer by layer (K/V 0.85 % apart at layer 5, 10 % at layer 20); the simulation with
    # K/V jittered by 1e-6 gave 36.96, 37.05, 37.10, 37.15 in 4 draws (the unjittered 36.92 lies below all
    # of them); on the same inputs the C++ write is byte-exact (tests/vllm_adaspkv/kv/test_real_activations.py)
    # and served attention equalled fake_quantize + SDPA exactly in a one-off check of layers 0-2.
    model_dir = resolve_model("shapes-llava") if oracle == "shapes-llava" else request.getfixturevalue("smol_llava_dir")
    seq_len = None if oracle == "shapes-llava" else 256
    limit = LIMIT[oracle]
    sparsity, kv_bits = (0.5, 4) if oracle == "shapes-llava" else (0.1, 8)
    artifact = make_artifact(tmp_path / "art", model_dir, [kv_bits] * read_geometry(model_dir).num_layers,
                             sparsity=sparsity)
    offline = evaluate(EvalConfig(model=oracle, artifact=str(artifact), limit=limit, batch_size=16, seq_len=seq_len),
                       model_dir)
    context = offline["wikitext2_seq_len"]  # a prompt-logprob request over a full window generates one token
    # smol-llava eager: torch.compile's warm-up of its 30 layers costs ~65 s; shapes-llava keeps vLLM's default
    # (compiled), so the plugin's model and attention are checked under torch.compile too
    eager = ("--enforce-eager",) if oracle == "smol-llava" else ()
    config = ServerConfig(model=str(artifact), log_file=tmp_path / "serve.log", startup_timeout_s=600,
                          env={**vllm_env, "VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1"},
                          extra_args=("--plugin", "adaspkv", *eager, "--dtype", "float32", "--kv-cache-memory-bytes",
                                      str(64 << 20), "--max-model-len", str(context + 1)))
    with VllmServer(config) as server:
        served = evaluate(EvalConfig(model=oracle, server=server.base_url, limit=limit, seq_len=seq_len), model_dir)
    log = config.log_file.read_text()
    assert "quantized KV cache on CPU: C++ kernels" in log  # the plugin's cache, not vLLM's
    assert len(served["shapesvqa_predictions"]) == len(offline["shapesvqa_predictions"]) == limit
    same = sum(a == b for a, b in zip(served["shapesvqa_predictions"], offline["shapesvqa_predictions"]))
    assert same >= limit - (0 if oracle == "shapes-llava" else 2), (served["shapesvqa_predictions"],
                                                                      offline["shapesvqa_predictions"])
    # the same windows, scored token by token: log-probabilities equal to float32 rounding
    assert served["wikitext2_windows"] == offline["wikitext2_windows"] == limit
    # smol-llava at 8 bits: served 35.3478 and 35.3390 in two runs against 35.3494 offline (3e-5, 3e-4); the
    # simulation with K/V jittered by 1e-6 moves by 6e-4: the rounding noise that 4 bits amplify to 0.5 %.
    # 2e-3 still catches the 10 % masks not being applied (dense: 36.80 on these windows, 4 % away).
    tolerance = 1e-4 if oracle == "shapes-llava" else 2e-3
    assert served["wikitext2_ppl"] == pytest.approx(offline["wikitext2_ppl"], rel=tolerance)
    assert offline["wikitext2_ppl"] != pytest.approx(evaluate(  # and the artifact is not the dense model
        EvalConfig(model=oracle, tasks=("wikitext2",), limit=limit, seq_len=seq_len), model_dir)["wikitext2_ppl"],
        rel=5 * tolerance if oracle == "smol-llava" else 1e-3)


def test_a_sharded_bf16_model_of_the_7b_family_serves_its_pruned_artifact(small_family_dir, tmp_path, vllm_env):
    """What the 7B benchmark serves, at small size: `adaspkv prune` (bf16, layer-by-layer calibration),
    then vLLM loads the sharded checkpoint with each mask applied as its tensor streams in."""
    from openai import OpenAI

    from offline_search.cli.main import main
    from offline_search.evaluation.openai_chat import ask, image_data_url, image_message

    artifact = tmp_path / "art"
    assert main(["prune", "--model", str(small_family_dir), "--metric", "magnitude", "--sparsity", "0.5",
                 "--kv-bits", "4", "--out", str(artifact), "--cache-dir", str(tmp_path / "cache"),
                 "--calibration-windows", "2", "--calibration-samples", "2", "--seq-len", "64",
                 "--objective-windows", "2", "--objective-samples", "2"]) == 0
    evaluation = EvalConfig(model=str(small_family_dir), tasks=("wikitext2",), limit=4, seq_len=64)
    offline = evaluate(evaluation.replace(artifact=str(artifact)), small_family_dir)
    config = ServerConfig(model=str(artifact), log_file=tmp_path / "serve.log", startup_timeout_s=600, env=vllm_env,
                          # eager: the plugin under torch.compile is the shapes-llava served, packed and demo tests'
                          extra_args=("--plugin", "adaspkv", "--enforce-eager", "--tokenizer", str(small_family_dir),
                                      "--dtype", "bfloat16", "--kv-cache-memory-bytes", str(16 << 20),
                                      "--max-model-len", "1024"))
    with VllmServer(config) as server:
        served = evaluate(evaluation.replace(server=server.base_url), small_family_dir)
        client = OpenAI(base_url=f"{server.base_url}/v1", api_key="none")
        photo = REPO / "demo" / "assets" / "images" / "waterview.jpg"
        answer = ask(client, str(artifact), [image_message("What is this?", image_data_url(photo))], 4)
    log = config.log_file.read_text()
    assert "quantized KV cache on CPU: C++ kernels" in log
    assert served["wikitext2_ppl"] == pytest.approx(offline["wikitext2_ppl"], rel=2e-2)  # bf16 on both sides
    dense = evaluate(evaluation, small_family_dir)["wikitext2_ppl"]
    assert offline["wikitext2_ppl"] != pytest.approx(dense, rel=1e-3)
    assert isinstance(answer, str)  # random weights: any text; the request went through the image path
