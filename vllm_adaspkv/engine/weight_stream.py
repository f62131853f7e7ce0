"""The Hugging Face weight stream of a served artifact, as the worker's `load_weights` passes it on to
vLLM: pruned weights masked, or replaced by the artifact's packed linears, or held back packed for the
modules served packed; every linear's zeros counted against the plan. No vLLM import: tested alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from vllm_adaspkv.engine.serving_plan import ServedArtifact
from vllm_adaspkv.format import (PLAN_FILE, ArtifactError, PackedMasks, PackedWeights, ZeroCount, canonical_key,
                                 mask_weight)
from vllm_adaspkv.sparse import packing


class ArtifactWeights:
    """Wraps a weight stream: `stream(weights)` yields what vLLM's own loader should see, keeps the packed
    weights of the keys in `to_pack` in `packed` instead; `check()` after the stream ends. One mask or
    packed weight is read at a time, as its weight streams in, and dropped after it."""

    def __init__(self, served: ServedArtifact, to_pack: set[str]):
        self.served = served
        self.to_pack = to_pack
        self.masks = PackedMasks(served.artifact_dir, served.plan) if served.has_masks else {}
        self.stored = PackedWeights(served.artifact_dir, served.plan) if served.plan.packed_weights else {}
        self.unused = set(self.masks.keys()) | set(self.stored.keys())
        self.zeros = ZeroCount(served.plan)
        self.packed: dict[str, packing.PackedWeight] = {}

    def stream(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        for name, weight in weights:
            key = canonical_key(name)
            self.unused.discard(key)
            if key in self.stored:  # the artifact's own pruned weight replaces the base model's
                packed = self.stored.get(key)
                self.zeros.observe_packed(key, packed)
                if key in self.to_pack:
                    self.packed[key] = packed
                    continue
                # served masked-dense (a GPU, tensor parallelism, a sparsity below the threshold)
                yield name, packing.unpack(packed).to(device=weight.device, dtype=weight.dtype)
                continue
            mask = None
            if key in self.masks:
                mask = self.masks.get(key)
                weight = mask_weight(weight, mask)
            self.zeros.observe(key, weight)
            if key in self.to_pack:  # from its mask, or from its zeros in a full checkpoint
                self.packed[key] = packing.pack(weight, weight != 0 if mask is None else mask)
                continue
            yield name, weight

    def check(self) -> None:
        """Every pruned weight of the artifact was in the stream, and every linear's zeros match the plan."""
        if self.unused:
            raise ArtifactError(f"{self.served.artifact_dir}: pruned weights the checkpoint does not have: "
                                f"{sorted(self.unused)[:3]}")
        self.zeros.check(str(self.served.artifact_dir / PLAN_FILE))
