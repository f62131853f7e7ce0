"""Writes vllm_adaspkv/format/adaspkv.schema.json, the JSON Schema of adaspkv.json, from the pydantic
models in vllm_adaspkv/format/schema.py (tests/vllm_adaspkv/format/test_schema.py keeps them equal).

    python scripts/write_artifact_schema.py
"""

import json
from pathlib import Path

from vllm_adaspkv.format import Plan

if __name__ == "__main__":
    path = Path(__file__).resolve().parent.parent / "vllm_adaspkv" / "format" / "adaspkv.schema.json"
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": "adaspkv.schema.json",
              **Plan.model_json_schema()}
    path.write_text(json.dumps(schema, indent=2) + "\n")
    print(f"wrote {path}")
