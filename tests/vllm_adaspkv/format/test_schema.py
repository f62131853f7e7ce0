"""The committed JSON Schema of adaspkv.json is the one the pydantic models generate."""

import json

from tests.conftest import REPO
from vllm_adaspkv.format import FORMAT_VERSION, LINEARS, Plan

SCHEMA_FILE = REPO / "vllm_adaspkv" / "format" / "adaspkv.schema.json"


def test_committed_schema_is_generated_from_the_models():
    # after a change to vllm_adaspkv/format/schema.py: python scripts/write_artifact_schema.py
    committed = json.loads(SCHEMA_FILE.read_text())
    assert committed.pop("$schema").startswith("https://json-schema.org/") and committed.pop("$id")
    assert committed == Plan.model_json_schema()


def test_schema_names_the_choices_a_reader_needs():
    schema = Plan.model_json_schema()
    layer = schema["$defs"]["LayerPlan"]
    assert layer["additionalProperties"] is False and schema["additionalProperties"] is False
    assert layer["properties"]["kv_bits"]["enum"] == [16, 8, 6, 4, 2]
    assert list(layer["properties"]["sparsity"]["propertyNames"]["enum"]) == list(LINEARS)
    assert schema["properties"]["format_version"]["const"] == FORMAT_VERSION
    assert schema["properties"]["layers"]["minItems"] == 1
