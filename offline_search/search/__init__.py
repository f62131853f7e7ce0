"""`adaspkv search` and `adaspkv prune` as a job: configuration (`config`), the whole run
(`compress`: calibrate, allocate, search, mask, export), the Optuna study (`study`), the artifact's
export (`export`) and its human-readable report (`report`)."""
