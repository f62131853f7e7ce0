"""Text corpora on disk: the bundled WikiText-2 splits, or any UTF-8 text file."""

from __future__ import annotations

from pathlib import Path

from vllm_adaspkv.errors import ConfigError

WIKITEXT_DIR = Path(__file__).parent / "wikitext-2"
WIKITEXT_SPLITS = {"validation": "valid.txt", "test": "test.txt"}


def wikitext_path(split: str) -> Path:
    if split not in WIKITEXT_SPLITS:
        raise ValueError(f"WikiText-2 split {split!r} is not bundled; choose from {', '.join(WIKITEXT_SPLITS)}")
    return WIKITEXT_DIR / WIKITEXT_SPLITS[split]


def read_lines(path: str | Path) -> list[str]:
    """The file's lines, line ends kept (the rows of the Hugging Face `wikitext` dataset)."""
    try:
        return Path(path).read_text(encoding="utf-8").splitlines(keepends=True)
    except FileNotFoundError:
        raise ConfigError(f"text file {str(path)!r} does not exist") from None


def joined_text(path: str | Path) -> str:
    """Rows joined with "\\n\\n": the perplexity protocol of the pruning papers (SparseGPT, Wanda)."""
    return "\n\n".join(read_lines(path))
