"""The offline side: prune a LLaVA's language model, search per-layer sparsity and KV bits, write an
artifact (`vllm_adaspkv.format`).

Subpackages, by job; imports run one way, from the top of this list down:
- `cli`: the `adaspkv` command and its subcommands (argparse lives only here).
- `search`, `evaluation`, `kit`: orchestration. The configured job: calibrate, allocate or search
  (Optuna), export (`search`); perplexity and ShapesVQA accuracy offline or through a server
  (`evaluation`); the test kit and the trainer of the bundled oracle (`kit`, which uses `evaluation`).
- `model`: adapters over a transformers LLaVA: its linears, calibration hooks, the in-memory pruner,
  the simulated KV cache, the search objective.
- `data`: text corpora, ShapesVQA, token batches, checkpoints in the llava-hf layout, the calibration
  cache, the bundled models and WikiText-2 (all file I/O of the offline side).
- `core`: pure tensor math: pruning metrics, masks, SparseGPT, TAMP, allocations, KV bit plans,
  perplexity. No model, no files, no Optuna.
"""
