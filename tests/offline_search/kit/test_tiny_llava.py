import json

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from offline_search.data.checkpoint import llava_hf_state_dict, load_llava, to_llava_hf_name
from offline_search.kit.tiny_llava import (
    IMAGE_TOKEN,
    TinyLlavaSpec,
    build_tiny_llava,
)

LLAVA_HF_PREFIXES = (
    "vision_tower.vision_model.",
    "language_model.model.",
    "language_model.lm_head.",
    "multi_modal_projector.",
)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_layers": 0}, r"^num_layers = 0: must be greater than or equal to 1$"),
        ({"num_heads": 4, "num_kv_heads": 3}, r"num_heads=4 must be a multiple of num_kv_heads=3"),
        ({"vision_hidden_size": 30, "vision_heads": 4}, r"vision_hidden_size=30 .* vision_heads=4"),
        ({"image_size": 30, "patch_size": 8}, r"image_size=30 must be a multiple of patch_size=8"),
        ({"vision_layers": 1}, r"^vision_layers = 1: must be greater than or equal to 2$"),
        ({"vocab_size": 100}, r"^vocab_size = 100: must be greater than or equal to 300$"),
        ({"vision_feature_layer": 0}, r"vision_feature_layer=0 must be in \[-2, -1\]"),
    ],
)
def test_spec_rejects_bad_sizes(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TinyLlavaSpec(**kwargs)


def test_sizes_follow_the_spec():
    spec = TinyLlavaSpec(num_layers=3, hidden_size=96, num_heads=6, num_kv_heads=2, head_dim=32,
                         image_size=48, patch_size=16)
    model, processor = build_tiny_llava(spec)
    text = model.config.text_config
    assert (text.num_hidden_layers, text.hidden_size) == (3, 96)
    assert (text.num_attention_heads, text.num_key_value_heads, text.head_dim) == (6, 2, 32)
    attn = model.model.language_model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (6 * 32, 96)
    assert attn.k_proj.weight.shape == (2 * 32, 96)  # grouped-query attention
    assert spec.num_image_tokens == 9
    assert text.vocab_size == len(processor.tokenizer) <= spec.vocab_size


def test_same_seed_same_weights_other_seed_other_weights():
    a, _ = build_tiny_llava(TinyLlavaSpec(seed=1))
    b, _ = build_tiny_llava(TinyLlavaSpec(seed=1))
    c, _ = build_tiny_llava(TinyLlavaSpec(seed=2))
    wa, wb, wc = (m.model.language_model.layers[0].mlp.up_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb)
    assert not torch.equal(wa, wc)


def test_chat_template_and_image_token_expansion():
    spec = TinyLlavaSpec()
    _, processor = build_tiny_llava(spec)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which colour?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == "<s>USER: <image>\nWhich colour? ASSISTANT:"
    plain = processor.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert plain == "<s>USER: hi ASSISTANT:"

    inputs = processor(images=Image.new("RGB", (50, 40), "red"), text=prompt, return_tensors="pt",
                       add_special_tokens=False)
    image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert int((inputs["input_ids"] == image_id).sum()) == spec.num_image_tokens == 16
    assert inputs["input_ids"][0, 0] == processor.tokenizer.bos_token_id
    assert inputs["input_ids"][0, 1] != processor.tokenizer.bos_token_id
    assert tuple(inputs["pixel_values"].shape) == (1, 3, 32, 32)


def test_question_first_chat_template_puts_the_image_after_the_question():
    _, processor = build_tiny_llava(TinyLlavaSpec(question_first=True))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which colour?"}]},
                {"role": "assistant", "content": "red"}, {"role": "user", "content": "And the shape?"}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == "<s>USER: Which colour?\n<image> ASSISTANT: red</s> USER: And the shape? ASSISTANT:"
    assert processor.tokenizer.chat_template == processor.chat_template  # what vLLM's server reads


def test_tokenizer_round_trips_any_text():
    _, processor = build_tiny_llava(TinyLlavaSpec())
    text = "Ünïcödé text, numbers 12345 and a <image> token"
    ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert processor.tokenizer.decode(ids) == text


def test_llava_hf_names():
    assert to_llava_hf_name("model.language_model.layers.0.mlp.up_proj.weight") == (
        "language_model.model.layers.0.mlp.up_proj.weight")
    assert to_llava_hf_name("model.vision_tower.embeddings.patch_embedding.weight") == (
        "vision_tower.vision_model.embeddings.patch_embedding.weight")
    assert to_llava_hf_name("lm_head.weight") == "language_model.lm_head.weight"
    assert to_llava_hf_name("model.multi_modal_projector.linear_1.bias") == "multi_modal_projector.linear_1.bias"
    with pytest.raises(ValueError, match=r"parameter 'encoder.weight' is not part of a LlavaForConditionalGeneration"):
        to_llava_hf_name("encoder.weight")


def test_saved_checkpoint_uses_llava_hf_layout_and_reloads_exactly(tiny_llava_dir):
    files = {p.name for p in tiny_llava_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja",
            "processor_config.json"} <= files
    config = json.loads((tiny_llava_dir / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"]

    with safe_open(tiny_llava_dir / "model.safetensors", "pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}
    assert all(k.startswith(LLAVA_HF_PREFIXES) for k in saved), sorted(saved)[:5]

    # The saved file is the seeded model, and transformers reads every tensor back unchanged.
    original, _ = build_tiny_llava(TinyLlavaSpec())
    expected = llava_hf_state_dict(original)
    assert saved.keys() == expected.keys()
    assert all(torch.equal(saved[k], expected[k]) for k in saved)
    reloaded, _ = load_llava(tiny_llava_dir)
    assert all(torch.equal(v, expected[k]) for k, v in llava_hf_state_dict(reloaded).items())
