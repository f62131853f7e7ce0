import torch

from offline_search.data.shapes_vqa import samples
from offline_search.data.vqa_batches import IGNORE_INDEX, answer_batch, prompt_inputs, question_prompt, random_windows
from offline_search.kit.tiny_llava import TinyLlavaSpec, build_processor

SPEC = TinyLlavaSpec(image_size=64, patch_size=16)


def test_labels_cover_exactly_the_answer_and_end_token():
    processor = build_processor(SPEC)
    tok = processor.tokenizer
    batch = samples("train", 3, image_size=64)
    out = answer_batch(processor, batch)
    assert out["pixel_values"].shape == (3, 3, 64, 64)
    for row, s in enumerate(batch):
        labelled = out["labels"][row][out["labels"][row] != IGNORE_INDEX].tolist()
        assert labelled == tok(f" {s.answer}</s>", add_special_tokens=False)["input_ids"]
        n = int(out["attention_mask"][row].sum())
        prompt = tok.decode(out["input_ids"][row, :n])
        assert prompt.startswith("<s>USER: <image>")
        assert prompt.endswith(f"{s.question} ASSISTANT: {s.answer}</s>")
        assert (out["input_ids"][row, n:] == tok.pad_token_id).all()


def test_prompts_are_left_padded_for_generation():
    processor = build_processor(SPEC)
    batch = samples("train", 4, image_size=64)
    out = prompt_inputs(processor, batch)
    assert (out["attention_mask"][:, -1] == 1).all()  # every prompt ends at the right edge
    assert question_prompt(processor, "Why?") == "<s>USER: <image>\nWhy? ASSISTANT:"


def test_random_windows():
    tokens = torch.arange(100)
    out = random_windows(tokens, 5, 10, torch.Generator().manual_seed(0))
    assert out.shape == (5, 10)
    assert ((out[:, 1:] - out[:, :-1]) == 1).all()  # contiguous slices of the stream
