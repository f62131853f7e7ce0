"""Model names that every `--model` option accepts besides a directory."""

from __future__ import annotations

from pathlib import Path

from vllm_adaspkv.errors import ConfigError

MODELS_DIR = Path(__file__).parent / "models"
SHAPES_LLAVA_DIR = MODELS_DIR / "shapes-llava"
# name -> what it is (the model cards in models/NAME/README.md say more)
BUNDLED_MODELS: dict[str, str] = {
    "shapes-llava": "1.7M parameters trained here from scratch: the fast oracle of the tests",
    "smol-llava": "SmolLM2-135M-Instruct (pretrained) with a vision tower trained here: the quality oracle",
}


def resolve_model(name_or_dir: str | Path) -> Path:
    """A bundled model's directory (smol-llava's is assembled on first use), or the given checkpoint
    directory (which must hold config.json)."""
    name = str(name_or_dir)
    if name == "shapes-llava":
        if not (SHAPES_LLAVA_DIR / "config.json").is_file():
            raise ConfigError(f"bundled model {name!r} is missing from {SHAPES_LLAVA_DIR}; reinstall the package")
        return SHAPES_LLAVA_DIR
    if name == "smol-llava":
        from offline_search.data.smol_llava import smol_llava_dir

        return smol_llava_dir()
    path = Path(name)
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"model {name!r} is neither a bundled model ({', '.join(BUNDLED_MODELS)}) nor a "
            "checkpoint directory with a config.json"
        )
    return path
