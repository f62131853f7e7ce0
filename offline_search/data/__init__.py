"""Data and files of the offline side: every read and write outside the artifact itself.

Text corpora (`text_data`: the bundled WikiText-2 in `wikitext-2/`, any file), calibration inputs
(`calibration_data`: text streams, `datasets` datasets, image folders), ShapesVQA (`shapes_vqa`,
drawn procedurally), token batches for a LLaVA processor (`vqa_batches`), checkpoints in the llava-hf
layout (`checkpoint`), the cache of calibration statistics (`calibration_cache`), and the models
bundled with the package (`bundled_models`, files in `models/`).
"""
