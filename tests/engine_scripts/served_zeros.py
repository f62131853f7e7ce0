"""Runs inside vLLM's worker through `LLM.apply_model`: where the served linear weights are zero.

On CPU vLLM repacks linear weights for oneDNN and empties `weight`, so each linear is probed
instead: fed the identity, y = I W^T gives the served W back exactly (one product per entry).
"""

import numpy as np
import torch

FUSED = {"qkv_proj": "self_attn.qkv_proj", "o_proj": "self_attn.o_proj",
         "gate_up_proj": "mlp.gate_up_proj", "down_proj": "mlp.down_proj"}


def served_weight(linear: torch.nn.Module) -> torch.Tensor:
    """[out, in] as the served layer computes with it."""
    dtype = next(linear.parameters()).dtype
    eye = torch.eye(linear.input_size, dtype=dtype)
    out = linear(eye)
    return (out[0] if isinstance(out, tuple) else out).t()


@torch.inference_mode()
def zero_maps(model):
    """Per decoder layer and fused linear: the packed bits of weight == 0 (rows in vLLM's order)."""
    out = {}
    for i, layer in enumerate(model.language_model.model.layers):
        for name, path in FUSED.items():
            zeros = (served_weight(layer.get_submodule(path)) == 0).cpu().numpy()
            out[f"{i}.{name}"] = {"shape": list(zeros.shape), "bits": np.packbits(zeros).tolist()}
    return out
