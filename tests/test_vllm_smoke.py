"""The tiny LLaVA through vLLM, each engine in a fresh process: `vllm serve` with the plugin flag
and the OpenAI API, and `LLM(...)` checked token for token against transformers."""

import json
import subprocess
import sys

import pytest
import requests
import torch
from openai import OpenAI
from PIL import Image

from offline_search.data.checkpoint import load_llava
from offline_search.evaluation.openai_chat import ask, image_data_url, image_message
from offline_search.evaluation.vllm_server import ServerConfig, VllmServer
from offline_search.kit.tiny_llava import TinyLlavaSpec
from tests.conftest import ENGINE_SCRIPTS

pytestmark = pytest.mark.slow

MAX_TOKENS = 6


@pytest.fixture(scope="module")
def server(tiny_llava_dir, vllm_env, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "vllm-serve.log"
    config = ServerConfig(model=str(tiny_llava_dir), log_file=log, served_model_name="tiny",
                          # eager: the plugin under torch.compile is the shapes-llava served, packed and demo tests'
                          extra_args=("--plugin", "adaspkv", "--enforce-eager",
                                      "--kv-cache-memory-bytes", str(32 << 20)),
                          env=vllm_env, startup_timeout_s=600)
    with VllmServer(config) as running:
        yield running


def test_served_image_and_text_chat(server, red_square, tiny_llava_dir):
    client = OpenAI(base_url=f"{server.base_url}/v1", api_key="EMPTY")
    assert [m.id for m in client.models.list().data] == ["tiny"]

    image_reply = client.chat.completions.create(
        model="tiny", messages=[image_message("What colour?", image_data_url(red_square))],
        max_tokens=MAX_TOKENS, temperature=0.0)
    text_reply = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "What colour?"}],
        max_tokens=MAX_TOKENS, temperature=0.0)
    for reply in (image_reply, text_reply):
        assert reply.object == "chat.completion"
        assert reply.choices[0].message.role == "assistant"
        assert isinstance(reply.choices[0].message.content, str)
        assert reply.usage.completion_tokens <= MAX_TOKENS
    # The server rendered the chat template and expanded the image to its patch tokens, exactly
    # as the model's own processor does.
    _, processor = load_llava(tiny_llava_dir)
    image_prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}],
        add_generation_prompt=True)
    image_ids = processor(images=Image.open(red_square).convert("RGB"), text=image_prompt,
                          add_special_tokens=False)["input_ids"][0]
    text_ids = processor(text=processor.apply_chat_template(
        [{"role": "user", "content": "What colour?"}], add_generation_prompt=True),
                         add_special_tokens=False)["input_ids"][0]
    assert image_reply.usage.prompt_tokens == len(image_ids)
    assert text_reply.usage.prompt_tokens == len(text_ids)
    assert image_ids.count(processor.tokenizer.convert_tokens_to_ids("<image>")) == (
        TinyLlavaSpec().num_image_tokens)

    assert "is not an artifact directory (no adaspkv.json): served as stock" in server.config.log_file.read_text()


def test_server_rejects_a_bad_image_and_keeps_serving(server):
    bad = image_message("What colour?", "data:image/png;base64,bm90IGFuIGltYWdl")
    response = requests.post(f"{server.base_url}/v1/chat/completions",
                             json={"model": "tiny", "messages": [bad], "max_tokens": 2}, timeout=60)
    assert response.status_code == 400
    assert "error" in response.json()
    client = OpenAI(base_url=f"{server.base_url}/v1", api_key="EMPTY")
    assert isinstance(ask(client, "tiny", [{"role": "user", "content": "hi"}], 2), str)


def test_llm_generate_matches_transformers(tiny_llava_dir, vllm_env, red_square, tmp_path):
    result_file = tmp_path / "generated.json"
    out = subprocess.run(
        [sys.executable, str(ENGINE_SCRIPTS / "llm_generate.py"), str(tiny_llava_dir),
         str(red_square), str(MAX_TOKENS), str(result_file)],
        capture_output=True, text=True, env=vllm_env, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    results = json.loads(result_file.read_text())

    model, processor = load_llava(tiny_llava_dir)
    image = Image.open(red_square).convert("RGB")
    for result, images in zip(results, (None, image)):
        inputs = processor(images=images, text=result["prompt"], return_tensors="pt")
        assert inputs["input_ids"][0].tolist() == result["prompt_token_ids"]
        with torch.no_grad():
            expected = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False,
                                      min_new_tokens=MAX_TOKENS)
        assert expected[0, inputs["input_ids"].shape[1]:].tolist() == result["token_ids"]
