import copy
from pathlib import Path

import pytest
import torch

from offline_search.data.smol_llava import SmolLlavaSpec, read_vision
from offline_search.kit import train_smol_llava
from offline_search.kit.train_smol_llava import SmolTrainConfig, cosine_lr, train


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"spec": SmolLlavaSpec(patch_size=32)}, r"spec makes 4 image tokens; the caption slots are 16 words"),
    ({"probe_layer": 5}, r"probe_layer=5 must be at most the vision tower's 4 layers"),
    ({"caption_batch": 9, "vqa_batch": 8}, r"caption_batch=9 must be in \[0, vqa_batch=8\]"),
    ({"answer_steps": -1}, r"^answer_steps = -1: must be greater than or equal to 0$"),
    ({"vision_lr": 0.0}, r"^vision_lr = 0.0: must be greater than 0$"),
])
def test_train_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SmolTrainConfig(out_dir=Path("x"), **kwargs)


def test_cosine_lr_warms_up_then_decays_to_zero():
    assert cosine_lr(1e-3, 0, 100, 10) == pytest.approx(1e-4)
    assert cosine_lr(1e-3, 50, 100, 10) == pytest.approx(5e-4)
    assert cosine_lr(1e-3, 100, 100, 10) == pytest.approx(0.0)


@pytest.fixture
def one_thread():
    """The same kernels in every run: bitwise-comparable weights. Restored after: later tests (the served
    == offline comparisons) must run with the thread count they were measured with."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_weights_of_an_unbroken_one(tmp_path, monkeypatch, one_thread):
    real_build, built = train_smol_llava.build_smol_llava, {}

    def build_once(spec, seed):  # SmolLM2 read from its GGUF file once, not in each of the three runs
        if seed not in built:
            model_and_processor = real_build(spec, seed)
            built[seed] = (model_and_processor, torch.get_rng_state())
        (model, processor), rng = built[seed]
        torch.set_rng_state(rng)  # as it is after a fresh build: the probe's initialisation draws from it
        return copy.deepcopy(model), processor

    monkeypatch.setattr(train_smol_llava, "build_smol_llava", build_once)
    settings = dict(probe_steps=3, align_steps=2, answer_steps=1, image_batch=4, vqa_batch=2, caption_batch=1,
                    checkpoint_every=1, validate_every=1000)
    unbroken = read_vision(train(SmolTrainConfig(out_dir=tmp_path / "a", **settings)))

    calls = {"n": 0}
    real_loss = train_smol_llava.SmolTrainer.loss

    def dies_at_the_fifth_step(self, stage, step):
        calls["n"] += 1
        if calls["n"] == 5:  # the second align step: two stages' states behind it
            raise KeyboardInterrupt
        return real_loss(self, stage, step)

    monkeypatch.setattr(train_smol_llava.SmolTrainer, "loss", dies_at_the_fifth_step)
    with pytest.raises(KeyboardInterrupt):
        train(SmolTrainConfig(out_dir=tmp_path / "b", **settings))
    state = torch.load(tmp_path / "b" / "train_state.pt", weights_only=False)
    assert (state["stage"], state["step"]) == ("align", 1)
    monkeypatch.setattr(train_smol_llava.SmolTrainer, "loss", real_loss)
    resumed = read_vision(train(SmolTrainConfig(out_dir=tmp_path / "b", **settings)))

    assert not (tmp_path / "b" / "train_state.pt").exists()
    assert resumed[0] == unbroken[0] == SmolLlavaSpec()
    assert resumed[1].keys() == unbroken[1].keys()
    assert any(k.startswith("multi_modal_projector.") for k in resumed[1])
    assert any(k.startswith("vision_tower.vision_model.") for k in resumed[1])
    for key, tensor in unbroken[1].items():
        torch.testing.assert_close(resumed[1][key], tensor, rtol=0, atol=1e-6, msg=key)
