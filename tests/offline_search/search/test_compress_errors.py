"""Bad input to `adaspkv search` / `prune`: one line naming the problem, no traceback."""

import pytest

from offline_search.cli.main import main
from tests.conftest import REPO


def run(tmp_path, *args, model=None, command="search"):
    model = model or "shapes-llava"
    return main([command, "--model", str(model), "--out", str(tmp_path / "art"),
                 "--cache-dir", str(tmp_path / "cache"), *args])


@pytest.mark.parametrize(("args", "message"), [
    (["--metric", "wanda", "--sparsity", "1.0"], r"^adaspkv search: error: sparsity = 1.0: must be less than 1$"),
    (["--metric", "wanda", "--sparsity", "-0.1"], r"sparsity = -0.1: must be greater than or equal to 0$"),
    (["--metric", "wanda", "--sparsity", "0.5", "--nm", "2:4"],
     r"--nm 2:4 prunes every matrix at exactly 2/4; it cannot be combined with a per-layer allocation"),
    (["--metric", "wanda", "--sparsity", "0.6", "--nm", "2:4", "--allocation", "uniform"],
     r"--nm 2:4 means sparsity 0.5, but --sparsity is 0.6"),
    (["--metric", "magnitude", "--sparsity", "0.5", "--amia"], r"--amia selects the tokens"),
    (["--metric", "sparsegpt", "--sparsity", "0.5", "--comparison", "row"],
     r"--comparison row chooses among scores; SparseGPT fixes its own groups"),
    (["--metric", "wanda", "--sparsity", "0.5", "--nm", "2:4", "--allocation", "uniform", "--comparison", "matrix"],
     r"--comparison matrix chooses among scores; N:M structure fixes its own groups"),
    (["--metric", "wanda", "--sparsity", "0.5", "--trials", "0"], r"trials = 0: must be greater than or equal to 1$"),
    (["--metric", "wanda", "--sparsity", "0.5", "--allocation", "owl", "--warm-start", "das"],
     r"--warm-start seeds a TPE search"),
    (["--metric", "wanda", "--sparsity", "0.5", "--calibration-text", "none", "--calibration-images", "none"],
     r"calibration needs text or images"),
])
def test_config_errors(tmp_path, args, message):
    with pytest.raises(SystemExit, match=message):
        run(tmp_path, *args)


def test_missing_model(tmp_path):
    with pytest.raises(SystemExit, match=r"adaspkv prune: error: model '.*nope' is neither a bundled model"):
        run(tmp_path, "--metric", "wanda", "--sparsity", "0.5", model=tmp_path / "nope", command="prune")


def test_unknown_metric_is_an_argparse_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run(tmp_path, "--metric", "foo", "--sparsity", "0.5")
    assert "argument --metric: invalid choice: 'foo'" in capsys.readouterr().err


def test_empty_calibration_file(tiny_llava_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(SystemExit, match=f"calibration text '{empty}' is empty"):
        run(tmp_path, "--metric", "wanda", "--sparsity", "0.5", "--calibration-text", str(empty),
            model=tiny_llava_dir, command="prune")


def test_calibration_image_folder(tiny_llava_dir, tmp_path):
    import shutil

    import vllm_adaspkv.format as art
    from offline_search.data.calibration_data import image_samples

    folder = tmp_path / "photos"
    folder.mkdir()
    with pytest.raises(SystemExit, match="calibration folder '.*photos' has no image"):
        run(tmp_path, "--metric", "wanda", "--sparsity", "0.5", "--calibration-images", str(folder),
            model=tiny_llava_dir, command="prune")
    shutil.copy(REPO / "demo" / "assets" / "images" / "waterview.jpg", folder / "a.jpg")
    (folder / "a.txt").write_text("What is in this picture?\n")
    (folder / "b.png").write_bytes(b"not an image")
    (folder / "b.txt").write_text("Describe it.")
    with pytest.raises(SystemExit, match=r"calibration image '.*b.png' cannot be read"):
        run(tmp_path, "--metric", "wanda", "--sparsity", "0.5", "--calibration-images", str(folder),
            model=tiny_llava_dir, command="prune")
    (folder / "b.png").unlink()
    assert [s.question for s in image_samples(str(folder), 8, 32)] == ["What is in this picture?"]
    run(tmp_path, "--metric", "wanda", "--sparsity", "0.5", "--calibration-images", str(folder),
        "--allocation", "das", "--calibration-windows", "1", "--objective-windows", "1",
        model=tiny_llava_dir, command="prune")
    assert art.read_plan(tmp_path / "art").provenance.calibration["images"] == str(folder)


def test_calibration_text_from_a_datasets_dataset(tmp_path, monkeypatch):
    from offline_search.data.calibration_data import dataset_text

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no hub here: a local folder is a dataset too
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "train.txt").write_text("first row\nsecond row\n")
    assert dataset_text(f"dataset:{folder}:train") == "first row\n\nsecond row"
    with pytest.raises(ValueError, match="write dataset:NAME:SPLIT or dataset:NAME:CONFIG:SPLIT"):
        dataset_text("dataset:only-a-name")
    with pytest.raises(ValueError, match="'dataset:no-such/dataset:train': the dataset cannot be loaded"):
        dataset_text("dataset:no-such/dataset:train")
