"""Layer-by-layer calibration gathers the statistics a whole-model pass with hooks would."""

import torch

from offline_search.core.sparsegpt import accumulate_hessian
from offline_search.data.calibration_cache import HessianStore
from offline_search.data.calibration_data import image_samples
from offline_search.data.checkpoint import load_llava
from offline_search.data.vqa_batches import answer_batch
from offline_search.model.calibration import CalibrationConfig, calibrate
from offline_search.model.llava import model_linears


def whole_model_statistics(model, batches):
    """The reference: one forward pass of the whole model per batch, hooks on every linear."""
    sums, hessians, handles = {}, {}, []
    for key, linear in model_linears(model).items():
        def hook(module, inputs, output, key=key):
            x = inputs[0].float().reshape(-1, inputs[0].shape[-1])
            count, total = sums.get(key, (0, 0.0))
            sums[key] = (count + x.shape[0], total + x.pow(2).sum(0))
            hessians[key] = accumulate_hessian(*hessians.get(key, (None, 0)), x)
        handles.append(linear.register_forward_hook(hook))
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    for handle in handles:
        handle.remove()
    return {key: total / count for key, (count, total) in sums.items()}, {k: h for k, (h, _) in hessians.items()}


def test_layer_by_layer_statistics_equal_a_whole_model_pass_and_hessians_go_to_files(tiny_llava_dir, tmp_path):
    model, processor = load_llava(tiny_llava_dir)
    config = CalibrationConfig(text_windows=3, seq_len=32, image_samples=2, hessian=True)
    store = HessianStore(tmp_path / "entry.pt")
    stats = calibrate(model, processor, config, show_progress=False, save_hessians=store.save_layer)

    from offline_search.core.perplexity import windows
    from offline_search.data.calibration_data import text_tokens

    text = windows(text_tokens("wikitext2", processor.tokenizer), 32, 3)
    size = processor.image_processor.crop_size["height"]
    images = [answer_batch(processor, [sample]) for sample in image_samples("shapesvqa", 2, size)]
    batches = [{"input_ids": text}] + [{"input_ids": b["input_ids"], "pixel_values": b["pixel_values"]}
                                       for b in images]
    in_sq, hessians = whole_model_statistics(model, batches)
    assert set(stats) == set(in_sq)
    for key, expected in in_sq.items():
        torch.testing.assert_close(stats[key]["in_sq"], expected, rtol=1e-4, atol=1e-6)
        assert "hessian" not in stats[key]  # on disk, not in memory
        torch.testing.assert_close(store.get(key), hessians[key], rtol=1e-4, atol=1e-6)
    # k/v read q's input: one Hessian stored for the three
    assert len(list(store.directory.glob("layer-*.safetensors"))) == model.config.text_config.num_hidden_layers


def test_a_cache_entry_whose_hessians_were_deleted_is_calibrated_again(tiny_llava_dir, tmp_path):
    import shutil

    from offline_search.search.compress import cached_calibration
    from vllm_adaspkv.format import model_sha256

    model, processor = load_llava(tiny_llava_dir)
    config = CalibrationConfig(text_windows=1, image_samples=1, hessian=True)
    sha = model_sha256(tiny_llava_dir)
    _, path, hit = cached_calibration(model, processor, sha, config, tmp_path, show_progress=False)
    assert not hit and HessianStore(path).has_layers(model.config.text_config.num_hidden_layers)
    assert cached_calibration(model, processor, sha, config, tmp_path, show_progress=False)[2]
    shutil.rmtree(HessianStore(path).directory)
    _, _, hit = cached_calibration(model, processor, sha, config, tmp_path, show_progress=False)
    assert not hit and HessianStore(path).has_layers(model.config.text_config.num_hidden_layers)
