"""One-line errors of the validated models, worked out by hand on a small model."""

from typing import Annotated

import pytest
from pydantic import Field

from vllm_adaspkv.format.strict import ConfigError, LaxPath, ServerUrl, StrictModel, int_choice


class Inner(StrictModel):
    bits: int_choice((8, 4)) = 8
    share: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0


class Outer(StrictModel):
    name: str
    inner: Inner = Inner()
    layers: tuple[Inner, ...] = ()
    url: ServerUrl | None = None
    out: LaxPath | None = None


@pytest.mark.parametrize(("data", "message"), [
    ({"name": "a", "inner": {"bits": 5}}, r"^inner.bits = 5: allowed 8 or 4$"),
    ({"name": "a", "inner": {"bits": 8.0}}, r"^inner.bits = 8.0: must be an integer$"),  # 8.0 == 8 in Python
    ({"name": "a", "inner": {"bits": True}}, r"^inner.bits = True: must be an integer$"),
    ({"name": "a", "layers": (Inner(), {"share": 1}), }, r"^layers\[1\].share = 1: must be less than 1$"),
    ({"name": "a", "inner": {"shar": 0.5}}, r"^inner.shar: unknown field; allowed bits, share$"),
    ({"name": 3}, r"^name = 3: must be a string$"),
    ({}, r"^name: missing$"),
    ({"name": "a", "url": "localhost:8000"}, r"^url = 'localhost:8000': give a URL such as http://127.0.0.1:8000$"),
    ({"name": "a", "inner": {"bits": 5, "share": -1}}, r"^inner.bits = 5: allowed 8 or 4; inner.share = -1: must be "
                                                        r"greater than or equal to 0$"),
])
def test_errors_name_field_value_and_what_is_allowed(data, message):
    with pytest.raises(ConfigError, match=message):
        Outer(**data)


def test_valid_input_is_kept_frozen_and_replace_validates_again():
    outer = Outer(name="a", layers=(Inner(bits=4),), out="runs/x")
    assert outer.out.as_posix() == "runs/x" and outer.layers[0].bits == 4
    with pytest.raises(Exception, match="frozen"):
        outer.name = "b"
    assert outer.replace(name="b").name == "b"
    with pytest.raises(ConfigError, match=r"^name = 1: must be a string$"):
        outer.replace(name=1)


def test_parse_takes_json_data():
    assert Outer.parse({"name": "a", "layers": [{"bits": 4}]}).layers == (Inner(bits=4),)


def test_lists_and_paths_are_taken_where_python_callers_pass_them():
    from pathlib import Path

    from vllm_adaspkv.format.strict import AsTuple, PathText

    class Model(StrictModel):
        name: PathText
        items: Annotated[tuple[int, ...], AsTuple] = ()

    assert Model(name=Path("runs/x"), items=[1, 2]) == Model(name="runs/x", items=(1, 2))
    with pytest.raises(ConfigError, match=r"^items\[1\] = 2.0: must be a valid integer$"):
        Model(name="a", items=[1, 2.0])  # the items stay strict
