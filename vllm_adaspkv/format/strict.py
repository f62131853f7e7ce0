"""Validated models for configurations and files (pydantic v2), and the project's user-error types.

A `StrictModel` rejects unknown fields (a typo is reported, not ignored), takes numbers and booleans
only of their own type (8.0 is not a bit width, `true` is not a sparsity), and is frozen. Invalid
input raises the model's own error type, a ValueError, with one line that names each problem as
`field = value: what is allowed`, the field written as in the file (`layers[2].kv_bits`).
"""

from __future__ import annotations

import json
import re
import types
import typing
from pathlib import Path, PurePath
from typing import Annotated, Any, ClassVar, Literal, Self, get_args, get_origin

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Strict, ValidationError

from vllm_adaspkv.errors import AdaspkvError, ConfigError


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    error: ClassVar[type[AdaspkvError]] = ConfigError  # what invalid input raises

    def __init__(self, *args: Any, **data: Any) -> None:
        # positional arguments in field order, as a dataclass takes them: Endpoint("http://host:8000")
        fields = list(type(self).model_fields)
        if len(args) > len(fields):
            raise TypeError(f"{type(self).__name__}() takes at most {len(fields)} positional arguments")
        for name, value in zip(fields, args):
            if name in data:
                raise TypeError(f"{type(self).__name__}() got multiple values for {name!r}")
            data[name] = value
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise self.error(describe(exc, type(self))) from None

    # Only error wrapping: nested models are validated by pydantic's core, not through this __init__,
    # so an error deep inside keeps its full location (layers[2].kv_bits).
    __init__.__pydantic_base_init__ = True

    @classmethod
    def parse(cls, data: Any) -> Self:
        """A model from JSON data (objects and arrays), with the same one-line errors. Validated in
        pydantic's JSON mode, where an array is a tuple and numbers stay strict."""
        try:
            return cls.model_validate_json(json.dumps(data))
        except ValidationError as exc:
            raise cls.error(describe(exc, cls)) from None

    def replace(self, **changes: Any) -> Self:
        """A copy with some fields changed, validated again (pydantic's model_copy does not validate)."""
        return type(self)(**{**dict(self), **changes})


def _exact_int(value: Any) -> Any:
    # Literal[8] accepts 8.0 and True (they compare equal to 8 and 1): a typo in a file, not a width.
    if type(value) is not int:
        raise ValueError("must be an integer")
    return value


def int_choice(choices: tuple[int, ...]) -> Any:
    """The type of an integer field that takes one of `choices` (listed in the JSON Schema)."""
    return Annotated[Literal[choices], BeforeValidator(_exact_int)]


def _http_url(value: str) -> str:
    if not value.startswith(("http://", "https://")):
        raise ValueError("give a URL such as http://127.0.0.1:8000")
    return value


ServerUrl = Annotated[str, AfterValidator(_http_url)]  # the base URL of an HTTP server

# A path given as str or Path (the command line, JSON, Python callers): coerced to Path, not strict.
LaxPath = Annotated[Path, Strict(False)]


def _path_as_text(value: Any) -> Any:
    return str(value) if isinstance(value, PurePath) else value


# A model name or a directory, given as str or Path, kept as the str it names.
PathText = Annotated[str, BeforeValidator(_path_as_text)]


def _list_as_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


# On a tuple field: a list is taken as the tuple it lists, its items still checked strictly.
AsTuple = BeforeValidator(_list_as_tuple)


def describe(exc: ValidationError, model: type[BaseModel]) -> str:
    """One line for all the problems of a validation error, `; `-separated."""
    errors = exc.errors(include_url=False)
    # A container whose items failed also fails its length check (the failed items are dropped):
    # the deeper error is the cause, the shallower one noise.
    deeper = [e for e in errors if not any(len(o["loc"]) > len(e["loc"]) and o["loc"][:len(e["loc"])] == e["loc"]
                                           for o in errors)]
    return "; ".join(_describe_one(error, model) for error in deeper)


def _describe_one(error: dict, model: type[BaseModel]) -> str:
    loc = list(error["loc"])
    kind, value = error["type"], error.get("input")
    if loc and loc[-1] == "[key]":  # a dict key outside its Literal
        where = _location(loc[:-2])
        return f"{where}: unknown key {loc[-2]!r}; {_explain(error)}"
    where = _location(loc)
    if kind == "missing":
        return f"{where}: missing"
    if kind == "extra_forbidden":
        allowed = ", ".join(_fields_at(model, loc[:-1]))
        return f"{where}: unknown field; allowed {allowed}"
    if not where:  # a check across fields (model validator): its message says it all
        return _explain(error)
    return f"{where} = {_short(value)}: {_explain(error)}"


def _explain(error: dict) -> str:
    if error["type"] == "literal_error":
        return f"allowed {error['ctx']['expected']}"
    message = error["msg"]
    for prefix in ("Value error, ", "Assertion failed, "):
        message = message.removeprefix(prefix)
    message = re.sub(r"^\w+ should", "must", message)  # "Input should be ..." -> "must be ..."
    for pattern, words in _JSON_WORDS:  # the words of a JSON file, not of Python
        message = re.sub(pattern, words, message)
    return message


_JSON_WORDS = ((r"a valid dictionary( or instance of \w+)?", "an object"), (r"a valid (array|list)", "a list"),
               (r"a valid tuple", "a tuple"), (r"a valid boolean", "true or false"), (r"a valid string", "a string"))


def _location(loc: list) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text.lstrip(".")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _fields_at(model: type[BaseModel], loc: list) -> list[str]:
    """The field names of the model found at `loc` inside `model` (through tuples, lists, dicts)."""
    current: Any = model
    for part in loc:
        current = _unwrap(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(part) if isinstance(part, str) else None
            if field is None:
                return []
            current = field.annotation
        else:  # a container: its element (tuple, list) or value (dict) type
            args = [a for a in get_args(current) if a is not Ellipsis]
            if not args:
                return []
            current = args[-1]
    current = _unwrap(current)
    return list(current.model_fields) if isinstance(current, type) and issubclass(current, BaseModel) else []


def _unwrap(annotation: Any) -> Any:
    """Annotated[X, ...] -> X; X | None -> X."""
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation = get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            rest = [a for a in get_args(annotation) if a is not type(None)]
            if len(rest) != 1:
                return annotation
            annotation = rest[0]
        else:
            return annotation
