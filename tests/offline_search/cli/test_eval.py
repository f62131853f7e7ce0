import pytest

from offline_search.cli.main import main
from offline_search.data.bundled_models import SHAPES_LLAVA_DIR, resolve_model
from offline_search.evaluation.harness import EvalConfig
from vllm_adaspkv.errors import ConfigError


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tasks": ("wikitext2", "mmlu")}, r"^tasks\[1\] = 'mmlu': allowed 'wikitext2' or 'shapesvqa'$"),
        ({"tasks": ()}, r"^tasks = \(\): must have at least 1 item after validation, not 0$"),
        ({"limit": 0}, r"^limit = 0: must be greater than or equal to 1$"),
        ({"server": "localhost:8000"}, r"^server = 'localhost:8000': give a URL such as http://127.0.0.1:8000$"),
        ({"seq_len": 1}, r"^seq_len = 1: must be greater than or equal to 2$"),
        ({"batch_size": 0}, r"^batch_size = 0: must be greater than or equal to 1$"),
    ],
)
def test_eval_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EvalConfig(model="shapes-llava", **kwargs)


def test_resolve_model(tmp_path, tiny_llava_dir):
    assert resolve_model(tiny_llava_dir) == tiny_llava_dir
    assert resolve_model("shapes-llava") == SHAPES_LLAVA_DIR
    with pytest.raises(ConfigError, match=r"model 'nope' is neither a bundled model \(shapes-llava, smol-llava\) nor a checkpoint directory"):
        resolve_model("nope")
    with pytest.raises(ConfigError, match=r"neither a bundled model"):
        resolve_model(tmp_path)  # a directory without config.json


def test_eval_command_reports_bad_input_in_one_line():
    with pytest.raises(SystemExit, match=r"^adaspkv eval: error: tasks\[0\] = 'ppl': allowed 'wikitext2' or 'shapesvqa'$"):
        main(["eval", "--model", "shapes-llava", "--tasks", "ppl"])
    with pytest.raises(SystemExit, match=r"adaspkv eval: error: model 'missing-model' is neither"):
        main(["eval", "--model", "missing-model"])


def test_eval_command_on_the_tiny_model(tiny_llava_dir, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", str(tiny_llava_dir), "--limit", "3", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "wikitext2 perplexity" in printed and "shapesvqa accuracy" in printed
    import json

    results = json.loads(out.read_text())
    assert results["wikitext2_windows"] == 3 and results["shapesvqa_questions"] == 3
    assert len(results["shapesvqa_predictions"]) == 3
    assert results["settings"]["limit"] == 3
    assert results["unigram_ppl"] > 1
