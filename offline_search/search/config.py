"""The configuration of `adaspkv search` and `adaspkv prune`: one frozen, validated model."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Literal, get_args

from pydantic import Field, field_validator, model_validator

from offline_search.core.kv_plans import check_choices
from offline_search.core.metrics import PER_ROW, Metric
from offline_search.model.calibration import CalibrationConfig
from offline_search.model.objective import ObjectiveConfig
from vllm_adaspkv.errors import ConfigError
from vllm_adaspkv.format import StrictModel
from vllm_adaspkv.format.schema import EightBitFormat, KeyRotation, KVQuantScheme
from vllm_adaspkv.format.strict import AsTuple, LaxPath, PathText, int_choice
from vllm_adaspkv.kv.quant import KV_BITS

Allocation = Literal["uniform", "owl", "das", "tpe"]
ALLOCATIONS: tuple[str, ...] = get_args(Allocation)
KVSearch = Literal["none", "split", "budget", "pareto"]
KV_SEARCHES: tuple[str, ...] = get_args(KVSearch)
WarmStart = Literal["owl", "das"]
WARM_STARTS: tuple[str, ...] = get_args(WarmStart)
Comparison = Literal["row", "matrix"]
COMPARISONS: tuple[str, ...] = get_args(Comparison)
Device = Literal["auto", "cpu", "cuda"]
DEVICES: tuple[str, ...] = get_args(Device)
DEFAULT_BLOCKS = 8


class CompressConfig(StrictModel):
    model: PathText  # bundled name or checkpoint directory
    out: LaxPath  # the artifact directory (also holds the study database by default)
    sparsity: Annotated[float, Field(ge=0.0, lt=1.0)]
    metric: Metric
    allocation: Allocation = "tpe"
    nm: Annotated[tuple[int, int], AsTuple] | None = None  # N of every M pruned, e.g. (2, 4)
    blocks: Annotated[int, Field(ge=1)] | None = None  # None: 8, or one per layer when the model has fewer
    trials: Annotated[int, Field(ge=1)] = 50
    storage: str | None = None  # Optuna storage URL; default sqlite:///OUT/study.db
    study_name: str | None = None
    seed: int = 0
    warm_start: WarmStart | None = None  # enqueue the OWL or DAS plan after the uniform one
    amia: bool = False  # TAMP's token selection feeds the activation norms
    comparison: Comparison | None = None  # weights compete in their output row or the whole matrix; None: the metric's
    radius: Annotated[float, Field(gt=0.0)] = 0.05  # block sparsities S - radius ... S + radius
    step: Annotated[float, Field(gt=0.0)] = 0.025
    objective: ObjectiveConfig = ObjectiveConfig()
    calibration: CalibrationConfig = CalibrationConfig()
    kv_bits: int_choice(KV_BITS) = 16  # every layer's KV bits when they are not searched
    kv_search: KVSearch = "none"  # split: half 8-bit, half 6-bit; budget: mean <= kv_bits_budget; pareto
    kv_bits_budget: float | None = None
    kv_choices: Annotated[tuple[int, ...], AsTuple] = (2, 4, 6, 8, 16)  # ascending after validation
    kv_group: Annotated[int, Field(ge=1)] = 32  # quantization group along the head dimension
    kv_key_rotation: KeyRotation = "none"
    kv_eight_bit: EightBitFormat = "int8"  # fp8_e4m3: 8-bit layers store float8 e4m3 values (vLLM's fp8 cache)
    full_checkpoint: bool = False
    pack: bool = False  # served packed on CPU; stored packed (packed_weights.safetensors) unless full_checkpoint
    cache_dir: LaxPath | None = None  # default: $ADASPKV_CACHE_DIR or ~/.cache/adaspkv
    show_progress: bool = True
    device: Device = "auto"  # auto: cuda when available
    worker: bool = False  # join the study as an extra worker: run trials, write no artifact
    heartbeat_s: Annotated[float, Field(gt=0.0)] = 30.0  # a worker silent for 3 x this is dead: its trial reruns

    @field_validator("kv_choices")
    @classmethod
    def _sorted_choices(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        return check_choices(value)  # ascending: the budget searches step through the choices in order

    @model_validator(mode="after")
    def _consistent(self) -> CompressConfig:
        if self.nm is not None:
            n, m = self.nm
            if self.allocation != "uniform":
                raise ValueError(f"--nm {n}:{m} prunes every matrix at exactly {n}/{m}; it cannot be "
                                 f"combined with a per-layer allocation (--allocation {self.allocation})")
            if not math.isclose(self.sparsity, n / m):
                raise ValueError(f"--nm {n}:{m} means sparsity {n / m:g}, but --sparsity is {self.sparsity}")
        if self.kv_search == "budget" and self.kv_bits_budget is None:
            raise ValueError("--kv-search budget needs --kv-bits-budget B (mean bits per layer at most B)")
        if self.kv_bits_budget is not None and self.kv_bits_budget < min(self.kv_choices):
            raise ValueError(f"--kv-bits-budget {self.kv_bits_budget:g} is below the narrowest choice, "
                             f"{min(self.kv_choices)} bits")
        if self.kv_search != "none" and self.kv_bits != 16:
            raise ValueError("--kv-bits sets one width for every layer; it cannot be combined with --kv-search")
        if self.worker and not self.searches:
            raise ValueError("--worker runs search trials: it needs --allocation tpe or --kv-search")
        if self.warm_start is not None and self.allocation != "tpe":
            raise ValueError("--warm-start seeds a TPE search: use it with --allocation tpe")
        if self.comparison is not None and (self.nm is not None or self.metric == "sparsegpt"):
            raise ValueError(f"--comparison {self.comparison} chooses among scores; "
                             f"{'N:M structure' if self.nm else 'SparseGPT'} fixes its own groups")
        if self.amia and self.metric not in ("wanda", "lognorm"):
            raise ValueError(f"--amia selects the tokens of Wanda's and lognorm's activation term; "
                             f"metric {self.metric!r} has none")
        need = {"hessian": self.metric == "sparsegpt", "diversity": self.uses_das, "amia": self.amia}
        for name, needed in need.items():
            if needed and not getattr(self.calibration, name):
                raise ValueError(f"calibration must collect {name} for these settings")
        return self

    def resolved_device(self) -> str:
        import torch

        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda: torch sees no CUDA device here (torch.cuda.is_available() is False)")
        return ("cuda" if torch.cuda.is_available() else "cpu") if self.device == "auto" else self.device

    @property
    def per_row(self) -> bool:
        """Whether weights compete only inside their output row (Wanda's comparison group)."""
        return PER_ROW[self.metric] if self.comparison is None else self.comparison == "row"

    @property
    def searches(self) -> bool:
        return self.allocation == "tpe" or self.kv_search != "none"

    @property
    def kv_scheme(self) -> KVQuantScheme:
        """How K/V are stored below 16 bits: what the search simulates and the artifact records."""
        return KVQuantScheme(group_size=self.kv_group, key_rotation=self.kv_key_rotation, eight_bit=self.kv_eight_bit)

    @property
    def uses_das(self) -> bool:
        return self.allocation == "das" or self.warm_start == "das"

    @property
    def structure(self) -> str:
        return f"{self.nm[0]}:{self.nm[1]}" if self.nm else "unstructured"

    def with_model_layers(self, num_layers: int) -> CompressConfig:
        """Resolves the default block count against the model: the paper's 8, at most one per layer."""
        return self if self.blocks is not None else self.replace(blocks=min(DEFAULT_BLOCKS, num_layers))

    def default_study_name(self, model_sha256: str) -> str:
        """Names the model (by content hash) and the settings: reusing --out for another model or other
        settings starts another study instead of continuing this one."""
        if self.study_name:
            return self.study_name
        kv = "" if self.kv_search == "none" else f"-kv{self.kv_search}{self.kv_bits_budget or ''}"
        weights = f"s{self.sparsity:g}-b{self.blocks}" if self.allocation == "tpe" else f"s{self.sparsity:g}-{self.allocation}"
        nm = f"-{self.nm[0]}of{self.nm[1]}" if self.nm else ""
        nm += f"-{self.comparison}" if self.comparison else ""
        warm = f"-warm{self.warm_start}" if self.warm_start else ""
        return f"adaspkv-{model_sha256[:12]}-{self.metric}-{weights}{nm}{warm}{kv}-seed{self.seed}"

    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{(Path(self.out) / 'study.db').resolve()}"

    def search_settings(self, model_sha256: str) -> dict:
        """What a resumed study must share with the run that started it."""
        return {"model_sha256": model_sha256, "nm": list(self.nm) if self.nm else None,
                "warm_start": self.warm_start, "sparsity": self.sparsity, "metric": self.metric, "blocks": self.blocks,
                "radius": self.radius, "step": self.step, "amia": self.amia,
                "objective": self.objective.describe(), "calibration": repr(self.calibration),
                "allocation": self.allocation, "kv_search": self.kv_search, "kv_bits_budget": self.kv_bits_budget,
                "kv_choices": list(self.kv_choices), "kv_group": self.kv_group,
                "kv_key_rotation": self.kv_key_rotation,
                **({"kv_eight_bit": self.kv_eight_bit} if self.kv_eight_bit != "int8" else {}),
                **({"comparison": self.comparison} if self.comparison else {})}  # studies from before it resume
