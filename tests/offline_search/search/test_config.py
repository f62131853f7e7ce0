"""CompressConfig: what it normalises and what it refuses."""

import pytest

import vllm_adaspkv.format as art
from offline_search.cli.main import main
from offline_search.search.config import CompressConfig
from tests.offline_search.search.test_compress import small_run


def config(**changes) -> CompressConfig:
    return CompressConfig(**{"model": "m", "out": "runs/x", "sparsity": 0.5, "metric": "wanda", **changes})


def test_kv_choices_are_kept_ascending():
    assert config(kv_choices=(16, 8, 6, 4, 2)).kv_choices == (2, 4, 6, 8, 16)
    assert config(kv_choices=(8, 4, 8)).kv_choices == (4, 8)
    with pytest.raises(ValueError, match=r"^kv_choices = \(3, 8\): allowed 16, 8, 6, 4, 2$"):
        config(kv_choices=(3, 8))


def test_an_unsorted_kv_choices_option_searches_as_the_sorted_one(tiny_llava_dir, tmp_path):
    """The issue's command: --kv-choices 16,8,6,4,2 stopped with "below the narrowest choice, 16 bits"."""
    plans = []
    for name, choices in (("sorted", "2,4,6,8,16"), ("unsorted", "16,8,6,4,2")):
        out = tmp_path / name
        assert main(["search", *small_run(tiny_llava_dir, out, tmp_path / "cache"), "--sparsity", "0",
                     "--allocation", "uniform", "--kv-bits-budget", "6", "--kv-choices", choices,
                     "--trials", "3"]) == 0
        plans.append([layer.kv_bits for layer in art.read_plan(out).layers])
    assert plans[0] == plans[1] and sum(plans[0]) / len(plans[0]) == 6


def test_every_search_metric_is_one_an_artifact_can_name():
    from offline_search.core.metrics import METRICS
    from vllm_adaspkv.format import PLAN_METRICS

    assert set(METRICS) <= set(PLAN_METRICS) and set(PLAN_METRICS) - set(METRICS) == {"none"}


def test_the_eight_bit_format_is_a_setting_a_resumed_study_shares():
    """Studies started before the fp8 tier (no such key) resume with int8; an fp8 run is another study."""
    int8 = config().search_settings("0" * 64)
    assert "kv_eight_bit" not in int8
    assert config(kv_eight_bit="fp8_e4m3").search_settings("0" * 64) == {**int8, "kv_eight_bit": "fp8_e4m3"}
    assert config(kv_eight_bit="fp8_e4m3").kv_scheme.fp8(8) and not config().kv_scheme.fp8(8)
    with pytest.raises(ValueError, match=r"kv_eight_bit = 'fp8': allowed 'int8' or 'fp8_e4m3'"):
        config(kv_eight_bit="fp8")
