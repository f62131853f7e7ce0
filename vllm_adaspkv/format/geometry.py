"""The geometry of a LLaVA's language model, read once through transformers' AutoConfig.

A published config.json may leave fields out: llava-hf/llava-1.5-7b-hf's `text_config` gives no layer
count, heads, hidden or MLP size, which transformers fills with LlamaConfig's defaults (32, 32, 4096,
11008). Reading the raw JSON gets those wrong; AutoConfig fills them exactly as the model that loads
the checkpoint (transformers' or vLLM's) sees them. Everything that needs a layer count, head count or
weight shape (the plugin's checks and start-up table, the demo's profile, the search) reads it here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vllm_adaspkv.format.schema import LINEARS, ArtifactError


@dataclass(frozen=True)
class ModelGeometry:
    architectures: tuple[str, ...]
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int

    @classmethod
    def from_config(cls, config) -> ModelGeometry:
        """From a transformers config: a LLaVA's (its `text_config`) or a language model's own."""
        text = getattr(config, "text_config", None) or config
        heads = text.num_attention_heads
        # LlamaConfig sets head_dim = hidden_size // heads when the file has none
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        return cls(architectures=tuple(config.architectures or ()), num_layers=text.num_hidden_layers,
                   hidden_size=text.hidden_size, intermediate_size=text.intermediate_size, num_heads=heads,
                   num_kv_heads=getattr(text, "num_key_value_heads", None) or heads, head_dim=head_dim,
                   max_position_embeddings=text.max_position_embeddings)

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """[d_out, d_in] of each prunable linear of one decoder layer (Llama's layout)."""
        q, kv, h, mlp = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.hidden_size, \
            self.intermediate_size
        shapes = {"self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
                  "self_attn.o_proj": (h, q), "mlp.gate_proj": (mlp, h), "mlp.up_proj": (mlp, h),
                  "mlp.down_proj": (h, mlp)}
        return {name: shapes[name] for name in LINEARS}

    def linear_sizes(self) -> dict[str, int]:
        """Weights of each prunable linear of one decoder layer."""
        return {name: rows * cols for name, (rows, cols) in self.linear_shapes().items()}


def read_geometry(model_dir: str | Path) -> ModelGeometry:
    """The geometry of the checkpoint in `model_dir` (its config.json, defaults filled by transformers)."""
    from transformers import AutoConfig

    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ArtifactError(f"{model_dir}: no config.json; not a checkpoint directory")
    try:
        config = AutoConfig.from_pretrained(str(model_dir))
    except (OSError, ValueError, KeyError) as exc:  # transformers' errors for an unreadable or unknown config
        raise ArtifactError(f"{path}: transformers cannot read it ({type(exc).__name__}: {exc})") from None
    try:
        return ModelGeometry.from_config(config)
    except AttributeError as exc:
        raise ArtifactError(f"{path}: not the config of a Llama-style language model ({exc})") from None
