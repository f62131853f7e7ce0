"""The search objective's KL mode: a hand-checked divergence, and zero for the uncompressed model."""

import math

import pytest
import torch

from offline_search.data.checkpoint import load_llava
from offline_search.model.kv_simulation import apply_kv_plan
from offline_search.model.objective import Objective, ObjectiveConfig, kl_divergence
from vllm_adaspkv.format.schema import KVQuantScheme


def test_kl_divergence_by_hand():
    p = torch.tensor([[0.5, 0.5], [0.25, 0.75]]).log()
    q = torch.tensor([[0.25, 0.75], [0.25, 0.75]]).log()
    # 0.5 ln(0.5 / 0.25) + 0.5 ln(0.5 / 0.75) = 0.5 ln(4 / 3); identical rows: 0
    assert kl_divergence(p, q).tolist() == pytest.approx([0.5 * math.log(4 / 3), 0.0], abs=1e-7)


def test_kl_objective_is_zero_uncompressed_and_grows_with_fewer_kv_bits(tiny_llava_dir):
    model, processor = load_llava(tiny_llava_dir)
    objective = Objective(model, processor, ObjectiveConfig(kind="kl", windows=2))
    assert objective() == 0.0  # the reference is this very model
    values = []
    for bits in (8, 4, 2):
        apply_kv_plan(model, [bits] * model.config.text_config.num_hidden_layers, KVQuantScheme())
        values.append(objective())
    assert 0 < values[0] < values[1] < values[2]
    assert "KL(uncompressed || compressed)" in ObjectiveConfig(kind="kl").describe()


def test_unknown_objective_is_named():
    with pytest.raises(ValueError, match=r"^kind = 'ppl': allowed 'wikitext2', 'kl', 'shapesvqa' or 'mix'$"):
        ObjectiveConfig(kind="ppl")
