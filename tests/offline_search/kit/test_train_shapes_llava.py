from pathlib import Path

import pytest
import torch

from offline_search.data.checkpoint import load_llava
from offline_search.kit.tiny_llava import TinyLlavaSpec
from offline_search.kit.train_shapes_llava import TrainConfig, learning_rate, parameter_groups, train

SMALL = TinyLlavaSpec(image_size=32, patch_size=8, max_position_embeddings=64)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"steps": 0}, r"^steps = 0: must be greater than or equal to 1$"),
     ({"lr": 2.0}, r"^lr = 2.0: must be less than 1$"),
     ({"text_window": 65}, r"TrainConfig.text_window=65 must not exceed the model's max_position_embeddings=64"),
     ({"caption_batch": 9, "vqa_batch": 8}, r"TrainConfig.caption_batch=9 must be in \[0, vqa_batch=8\]"),
     ({"align_loss_weight": -1.0}, r"^align_loss_weight = -1.0: must be greater than or equal to 0$"),
     ({"decoder_weight_decay": -0.1}, r"^decoder_weight_decay = -0.1: must be greater than or equal to 0$")],
)
def test_train_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(out_dir=Path("x"), spec=SMALL, **kwargs)


def test_learning_rate_warms_up_then_decays():
    config = TrainConfig(out_dir=Path("x"), steps=100, warmup_steps=10, lr=1e-3, spec=SMALL, text_window=32)
    assert learning_rate(config, 0) == pytest.approx(1e-4)
    assert learning_rate(config, 9) == pytest.approx(1e-3)
    assert learning_rate(config, 55) == pytest.approx(5e-4)
    assert learning_rate(config, 100) == pytest.approx(0.0)


def test_only_the_decoder_linear_weights_get_the_decoder_weight_decay():
    from transformers import LlavaForConditionalGeneration

    from offline_search.kit.tiny_llava import build_llava_config, build_processor

    processor = build_processor(SMALL, ["a red circle left of a blue square"])
    model = LlavaForConditionalGeneration(build_llava_config(SMALL, processor.tokenizer))
    probe = torch.nn.Linear(4, 2)
    config = TrainConfig(out_dir=Path("x"), spec=SMALL, text_window=32, weight_decay=0.05, decoder_weight_decay=1.0)
    decoder, others = parameter_groups(config, model, probe)
    # 2 layers x 7 linears (q, k, v, o, gate, up, down), weights only.
    assert (len(decoder["params"]), decoder["weight_decay"], others["weight_decay"]) == (14, 1.0, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].startswith("model.language_model.layers.") and names[id(p)].endswith("proj.weight")
               for p in decoder["params"])
    assert len(decoder["params"]) + len(others["params"]) == len(list(model.parameters())) + 2


def test_a_killed_run_resumes_and_ends_with_the_same_weights(tmp_path, monkeypatch):
    def config(out):
        return TrainConfig(out_dir=out, steps=4, vqa_batch=2, caption_batch=1, text_batch=1, text_window=32,
                           checkpoint_every=2, warmup_steps=1, vqa_only_steps=1, spec=SMALL)

    straight, _ = load_llava(train(config(tmp_path / "straight")))

    # The same run killed during step 3 (two batches a step: questions, captions): the state of
    # step 2 stays on disk.
    import offline_search.kit.train_shapes_llava as training

    real_batch, calls = training.answer_batch, []

    def dying_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_batch(*args, **kwargs)

    monkeypatch.setattr(training, "answer_batch", dying_batch)
    with pytest.raises(KeyboardInterrupt):
        train(config(tmp_path / "resumed"))
    assert torch.load(tmp_path / "resumed" / "train_state.pt", weights_only=False)["step"] == 2
    monkeypatch.setattr(training, "answer_batch", real_batch)

    resumed, _ = load_llava(train(config(tmp_path / "resumed")))
    assert not (tmp_path / "resumed" / "train_state.pt").exists()
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name
