"""The artifact format and the model's geometry: what the search writes and the plugin serves.

The one home of the contract between `offline_search` (which writes artifacts), the plugin (which
serves them) and the demo (which shows them): the schema of `adaspkv.json` (`schema`, pydantic
models, JSON Schema committed beside it), reading, writing and checking an artifact's files
(`artifact`; the masks file: `packed_masks`; the packed linears' file: `packed_weights`; safetensors
written tensor by tensor: `safetensors_stream`), and the language model's geometry through
transformers' AutoConfig (`geometry`).
`strict` holds the validated-model base and the project's user-error types. No vLLM, no Optuna.
"""

from vllm_adaspkv.errors import AdaspkvError, ConfigError
from vllm_adaspkv.format.artifact import (
    ZeroCount,
    base_model_dir,
    canonical_key,
    check_base_model,
    check_checkpoint,
    check_num_layers,
    checkpoint_files,
    checkpoint_shapes,
    is_artifact,
    model_sha256,
    read_plan,
    relocate_base_model,
    retract_artifact,
    write_artifact,
)
from vllm_adaspkv.format.geometry import ModelGeometry, read_geometry
from vllm_adaspkv.format.packed_masks import (
    MASK_FILE,
    PLAN_FILE,
    PackedMaskMap,
    PackedMasks,
    check_mask_shapes,
    mask_weight,
    pack_mask,
    read_masks,
    unpack_mask,
)
from vllm_adaspkv.format.packed_weights import PACKED_FILE, PackedWeights
from vllm_adaspkv.format.schema import (
    FORMAT_VERSION,
    EIGHT_BIT_FORMATS,
    KEY_ROTATIONS,
    LINEARS,
    PLAN_METRICS,
    SPARSITY_TOLERANCE,
    ArtifactError,
    BaseCheckpoint,
    Evaluation,
    KVQuantScheme,
    LayerPlan,
    Plan,
    Provenance,
    mask_key,
    parse_mask_key,
    sparsity_differs,
)
from vllm_adaspkv.format.strict import StrictModel

__all__ = [
    "EIGHT_BIT_FORMATS", "FORMAT_VERSION", "KEY_ROTATIONS", "LINEARS", "MASK_FILE", "PACKED_FILE", "PLAN_FILE", "PLAN_METRICS", "SPARSITY_TOLERANCE",
    "AdaspkvError", "ArtifactError", "BaseCheckpoint", "ConfigError", "Evaluation", "KVQuantScheme", "LayerPlan",
    "ModelGeometry", "PackedMaskMap", "PackedMasks", "PackedWeights", "Plan", "Provenance", "StrictModel", "ZeroCount", "base_model_dir", "canonical_key",
    "check_base_model", "check_checkpoint", "checkpoint_files", "check_mask_shapes", "check_num_layers", "checkpoint_shapes",
    "is_artifact", "mask_key", "mask_weight", "model_sha256", "pack_mask", "parse_mask_key", "read_geometry", "read_masks",
    "read_plan", "relocate_base_model", "retract_artifact", "sparsity_differs", "unpack_mask", "write_artifact",
]
