"""`vllm serve ART_DIR --plugin adaspkv` as a user runs it: the OpenAI API over an artifact, bad
requests answered with HTTP 400 while the server keeps serving, bad artifacts stopped at start-up
with one line."""

import base64
import json
import subprocess

import pytest
import requests
from openai import BadRequestError, OpenAI

from offline_search.evaluation.openai_chat import image_data_url, image_message
from offline_search.evaluation.vllm_server import ServerConfig, VllmServer
from tests.conftest import venv_bin
from tests.vllm_adaspkv.artifacts import make_artifact
from vllm_adaspkv.format import PLAN_FILE

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, tiny_llava_dir):
    return make_artifact(tmp_path_factory.mktemp("art") / "tiny-8-4", tiny_llava_dir, [8, 4], sparsity=0.5)


@pytest.fixture(scope="module")
def server(artifact, vllm_env, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "vllm-serve.log"
    config = ServerConfig(model=str(artifact), log_file=log, env=vllm_env, startup_timeout_s=600,
                          # eager: the plugin under torch.compile is the shapes-llava served, packed and demo tests'
                          extra_args=("--plugin", "adaspkv", "--enforce-eager", "--kv-cache-memory-bytes",
                                      str(32 << 20), "--dtype", "float32", "--max-model-len", "256"))
    with VllmServer(config) as running:
        yield running


def test_artifact_served_under_its_own_name_through_the_plugin(server, artifact, red_square):
    client = OpenAI(base_url=f"{server.base_url}/v1", api_key="EMPTY")
    assert [m.id for m in client.models.list().data] == [str(artifact)]
    reply = client.chat.completions.create(
        model=str(artifact), messages=[image_message("What colour?", image_data_url(red_square))],
        max_tokens=5, temperature=0.0)
    assert reply.usage.completion_tokens == 5
    log = server.config.log_file.read_text()
    assert "adaspkv: serving" in log and "the same memory holds" in log
    assert "CPU KV cache size" in log


def test_bad_requests_get_400_and_the_server_keeps_serving(server, artifact):
    client = OpenAI(base_url=f"{server.base_url}/v1", api_key="EMPTY", max_retries=0)
    corrupt = "data:image/png;base64," + base64.b64encode(b"not a png at all").decode()
    with pytest.raises(BadRequestError):
        client.chat.completions.create(model=str(artifact), messages=[image_message("What?", corrupt)],
                                       max_tokens=3)
    with pytest.raises(BadRequestError, match="maximum context length|max_model_len|context length"):
        client.completions.create(model=str(artifact), prompt="word " * 400, max_tokens=3)
    reply = client.completions.create(model=str(artifact), prompt="The cat", max_tokens=3, temperature=0.0)
    assert reply.usage.completion_tokens == 3
    assert requests.get(f"{server.base_url}/health", timeout=10).status_code == 200


def serve_fails(args, env):
    out = subprocess.run([venv_bin("vllm"), "serve", *args], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    return out.stderr


def test_bad_artifact_stops_start_up_with_one_line(tmp_path, tiny_llava_dir, vllm_env):
    art = make_artifact(tmp_path / "bad", tiny_llava_dir, [8, 8])
    data = json.loads((art / PLAN_FILE).read_text())
    data["layers"].append(data["layers"][0])
    (art / PLAN_FILE).write_text(json.dumps(data))
    err = serve_fails([str(art), "--plugin", "adaspkv"], vllm_env)
    assert f"adaspkv: cannot serve {art}: {art / PLAN_FILE}: layers has 3 entries; the model has 2 " \
           "decoder layers" in err


def test_global_kv_cache_dtype_with_a_per_layer_plan_is_refused(artifact, vllm_env):
    err = serve_fails([str(artifact), "--plugin", "adaspkv", "--kv-cache-dtype", "fp8"], vllm_env)
    assert "--kv-cache-dtype fp8: the artifact" in err and "cannot be combined" in err
