"""Validation against the API's models without building model instances.

Register validates every item against the spec's ``Item`` and then publishes the item exactly
as it came; the model instances pydantic builds on the way (an ``Item``, a ``ChatReq`` of some
forty fields with their defaults, each message, choice and usage) are thrown away, and building
them was half the cost of validating. :func:`dict_validator` derives, from a model's own core
schema, a validator that checks the same thing and returns plain dicts: every model becomes a
typed dict with the same fields, field schemas, aliases and extra-field behaviour, and defaults
are not filled in. So the contract stays where it is (``schemas/api.py``); this is only a
cheaper way to ask it "valid or not".

Its error reports differ in detail (a non-object is a ``dict_type`` error, not ``model_type``;
union members are not labelled by model name), so callers take the errors of what it refuses
from the model itself, as :func:`invalid_items` does.
"""

from __future__ import annotations

import copy
from typing import Any, cast

import orjson
from pydantic import TypeAdapter, ValidationError
from pydantic_core import CoreSchema, ErrorDetails, SchemaValidator


def _field(field: dict[str, Any]) -> dict[str, Any]:
    """A model field as a typed-dict field: optional (and left out) when it has a default."""
    schema = field["schema"]
    required = schema.get("type") != "default"
    typed: dict[str, Any] = {
        "type": "typed-dict-field",
        "schema": _as_dicts(schema if required else schema["schema"]),
        "required": required,
    }
    if "validation_alias" in field:
        typed["validation_alias"] = field["validation_alias"]
    return typed


def _model_as_typed_dict(model: dict[str, Any]) -> dict[str, Any]:
    fields = model["schema"]
    if fields.get("type") != "model-fields":
        raise TypeError(f"unsupported model schema: {fields.get('type')!r}")
    config = model.get("config") or {}
    typed: dict[str, Any] = {
        "type": "typed-dict",
        "fields": {name: _field(field) for name, field in fields["fields"].items()},
    }
    extra = fields.get("extra_behavior") or config.get("extra_fields_behavior")
    if extra is not None:
        typed["extra_behavior"] = extra
    if "extras_schema" in fields:
        typed["extras_schema"] = _as_dicts(fields["extras_schema"])
    if "ref" in model:
        typed["ref"] = model["ref"]
    return typed


def _as_dicts(node: Any) -> Any:
    if isinstance(node, list):
        return [_as_dicts(n) for n in node]
    if isinstance(node, tuple):
        return tuple(_as_dicts(n) for n in node)
    if not isinstance(node, dict):
        return node
    if node.get("type") == "model":
        return _model_as_typed_dict(node)
    return {key: _as_dicts(value) for key, value in node.items()}


def dict_validator(model_type: Any) -> SchemaValidator:
    """A validator that accepts exactly what ``TypeAdapter(model_type)`` accepts, as dicts."""
    schema = copy.deepcopy(TypeAdapter(model_type).core_schema)
    return SchemaValidator(cast(CoreSchema, _as_dicts(schema)))


class ListValidator:
    """Validates a list of values against a model: which are invalid, and why, by index."""

    def __init__(self, model: type[Any]) -> None:
        self._fast = dict_validator(list[model])  # type: ignore[valid-type]
        self._model = TypeAdapter(model)

    def invalid_items(self, values: list[Any], *, strict: bool) -> dict[int, list[ErrorDetails]]:
        """The model's validation errors of each invalid value (locations within it), by index.

        The whole list is checked in one call of the fast validator; only what it refuses is
        validated again by the model, for the model's own error reports.
        """
        try:
            self._fast.validate_python(values, strict=strict)
        except ValidationError as exc:
            refused = sorted({int(error["loc"][0]) for error in exc.errors()})
        else:
            return {}
        by_item: dict[int, list[ErrorDetails]] = {}
        for index in refused:
            value = whole_floats_as_ints(values[index]) if strict else values[index]
            try:
                self._model.validate_python(value, strict=strict)
            except ValidationError as exc:
                by_item[index] = exc.errors(include_url=False)
        return by_item


def whole_floats_as_ints(node: Any) -> Any:
    """A copy of ``node`` with every whole float (``1.0``) as an int.

    In JSON Schema, which the spec's types are, ``1.0`` is an integer. Strict validation takes
    an int where a number is expected, but never a float where an integer is: validating this
    copy strictly refuses a string for a number (``"1"``) and accepts ``1.0`` for an integer,
    as the spec does. Only the copy is validated; the value sent stays as it was.

    Copied level by level, not recursively: a body may nest 1,024 levels (orjson's limit),
    more than Python's recursion allows.
    """
    result = _whole(node)
    stack: list[tuple[Any, Any]] = [(node, result)] if isinstance(node, dict | list) else []
    while stack:
        source, target = stack.pop()
        if isinstance(source, dict):
            for key, value in source.items():
                target[key] = child = _whole(value)
                if isinstance(value, dict | list):
                    stack.append((value, child))
        else:
            for value in source:
                target.append(child := _whole(value))
                if isinstance(value, dict | list):
                    stack.append((value, child))
    return result


def _whole(value: Any) -> Any:
    """A whole float as an int; an empty container to fill for a list or an object."""
    if isinstance(value, float):
        return int(value) if value.is_integer() else value
    if isinstance(value, dict):
        return {}
    if isinstance(value, list):
        return []
    return value


MAX_NESTING = 200
"""Deepest JSON a request may hold. Its record nests it a few levels deeper, and orjson
encodes at most 254 levels (it parses up to 1024): deeper, the record could not be written."""


_ORJSON_MAX_DEPTH = 254
"""Deepest nesting of lists and objects orjson writes ("Recursion limit reached" beyond)."""


def nesting_exceeds(node: Any, limit: int) -> bool:
    """Whether ``node`` (JSON as orjson parses it) nests lists and objects more than ``limit``
    levels deep.

    Asked of orjson, which writes ``node`` inside ``254 - limit`` more levels of lists and
    gives up past 254: a walk in Python took 21 s for a body of 21,000,000 empty lists
    (64 MB), blocking every request meanwhile; orjson writes it in 0.2 s.
    """
    if not 0 < limit <= _ORJSON_MAX_DEPTH:
        raise ValueError(f"limit must be 1-{_ORJSON_MAX_DEPTH}")
    wrapped = node
    for _ in range(_ORJSON_MAX_DEPTH - limit):
        wrapped = [wrapped]
    try:
        orjson.dumps(wrapped)
    except orjson.JSONEncodeError as exc:
        if "Recursion limit" in str(exc):
            return True
        raise
    return False
