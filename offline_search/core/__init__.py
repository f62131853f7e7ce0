"""Pure tensor math of the offline search: functions of tensors and numbers only.

Pruning scores (`metrics`), masks (`masks`), SparseGPT's update (`sparsegpt`), TAMP's diversity and
token selection (`tamp`), sparsity allocations (`allocation`), KV bit plans (`kv_plans`), perplexity
and KL (`perplexity`). Nothing here touches a model, a file, Optuna or argparse: the tests check
each function on matrices small enough to work out by hand.
"""
