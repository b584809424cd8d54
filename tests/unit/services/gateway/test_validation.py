"""The dict validator must accept exactly what the model accepts."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path
from typing import Any

import pytest
from pydantic import TypeAdapter, ValidationError

from schemas.api import ChatReq, Item
from services.gateway.validation import ListValidator, dict_validator, nesting_exceeds

EXAMPLES = Path(__file__).parents[4] / "schemas" / "examples"

RICH: dict[str, Any] = {
    "input": {
        "model": "openai/gpt-4o",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": "https://x/y.png"}},
                ],
            },
            {"role": "assistant", "tool_calls": [{"id": "t", "type": "function",
                                                  "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "t", "content": "42"},
        ],
        "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {}}},
        "tool_choice": {"type": "function", "function": {"name": "f"}},
        "stop": ["\n"],
        "temperature": 0.5,
        "metadata": {"k": "v"},
        "tags": ["a"],
        "trace": {"id": "tr", "span_id": "s"},
    },
    "output": {
        "id": "chatcmpl-1",
        "created": 1767225600,
        "model": "openai/gpt-4o",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4,
                  "prompt_tokens_details": {"cached_tokens": 0}},
        "spend": 0.001,
        "tags": ["b"],
        "metadata": {"m": 1},
    },
    "tags": ["c"],
    "metadata": {"split": "train"},
}  # fmt: skip

ODD_VALUES: list[Any] = [
    *(None, 0, 1, -1, 1.5, True, False, "", "s", "user", [], [1], ["s"], {}, {"x": 1}),
    *({"role": "user"}, {"type": "text", "text": "t"}, 10**30),
]


def _seeds() -> list[Any]:
    items: list[Any] = [RICH, {"input": {"messages": []}}]
    for path in sorted(EXAMPLES.glob("register_*.json")):
        items += json.loads(path.read_text())["items"]
    return items


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix]
    if isinstance(value, dict):
        for key, child in value.items():
            found += _paths(child, (*prefix, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            found += _paths(child, (*prefix, index))
    return found


def _mutate(item: Any, rng: random.Random) -> Any:
    """One random change somewhere in the item: a value replaced, a key dropped or added."""
    item = copy.deepcopy(item)
    path = rng.choice(_paths(item))
    if not path:
        return rng.choice(ODD_VALUES)
    parent = item
    for step in path[:-1]:
        parent = parent[step]
    last = path[-1]
    action = rng.random()
    if action < 0.6:
        parent[last] = rng.choice(ODD_VALUES)
    elif action < 0.8 and isinstance(parent, dict):
        del parent[last]
    elif isinstance(parent[last], dict):
        parent[last][rng.choice(["extra", "schema", "type", "role", "id"])] = rng.choice(ODD_VALUES)
    else:
        parent[last] = [parent[last]]
    return item


def _model_accepts(adapter: TypeAdapter[Any], value: Any) -> bool:
    try:
        adapter.validate_python(value, strict=True)
    except ValidationError:
        return False
    return True


def test_dict_validator_agrees_with_the_model_on_thousands_of_mutated_items() -> None:
    rng = random.Random(20261125)
    model = TypeAdapter(Item)
    fast = dict_validator(Item)
    seeds = _seeds()
    accepted = refused = 0
    for _ in range(4000):
        value = _mutate(rng.choice(seeds), rng)
        if rng.random() < 0.3:
            value = _mutate(value, rng)
        expected = _model_accepts(model, value)
        try:
            fast.validate_python(value, strict=True)
            got = True
        except ValidationError:
            got = False
        assert got is expected, value
        accepted += expected
        refused += not expected
    assert accepted > 500  # both sides were exercised
    assert refused > 500


@pytest.mark.parametrize("seed", range(len(_seeds())))
def test_valid_examples_pass_both(seed: int) -> None:
    value = _seeds()[seed]
    assert _model_accepts(TypeAdapter(Item), value)
    dict_validator(Item).validate_python(value, strict=True)


@pytest.mark.parametrize(
    "json_schema",
    [{"name": "n", "schema": {}}, {"name": "n", "schema_": {}}, {"name": "n", "schema": 1}],
    ids=["alias", "field-name", "wrong-type"],
)
def test_aliases_behave_as_in_the_model(json_schema: dict[str, Any]) -> None:
    value = {"messages": [], "response_format": {"type": "json_schema", "json_schema": json_schema}}
    model = _model_accepts(TypeAdapter(ChatReq), value)
    try:
        dict_validator(ChatReq).validate_python(value, strict=True)
        fast = True
    except ValidationError:
        fast = False
    assert fast is model


def test_extra_fields_are_refused_where_the_model_refuses_them() -> None:
    with pytest.raises(ValidationError):
        dict_validator(ChatReq).validate_python({"messages": [], "unknown": 1}, strict=True)
    dict_validator(Item).validate_python(  # the output's choice allows extra fields
        {"input": {"messages": []}, "output": {"choices": [{"message": {"role": "a"}, "x": 1}]}},
        strict=True,
    )


def test_invalid_items_reports_the_models_own_errors_by_index() -> None:
    items: list[Any] = [RICH, "text", {"input": {"messages": [{"role": "robot"}]}}, RICH]
    found = ListValidator(Item).invalid_items(items, strict=True)
    assert sorted(found) == [1, 2]
    for index, errors in found.items():
        with pytest.raises(ValidationError) as caught:
            TypeAdapter(Item).validate_python(items[index], strict=True)
        assert errors == caught.value.errors(include_url=False)
    assert found[1][0]["type"] == "model_type"
    assert ListValidator(Item).invalid_items([RICH, RICH], strict=True) == {}


def _nested(depth: int, leaf: Any) -> Any:
    for _ in range(depth):
        leaf = [leaf]
    return leaf


@pytest.mark.parametrize(("leaf", "levels"), [([], 1), ({}, 1), ({"a": [1]}, 2), ("x", 0)], ids=str)
def test_nesting_is_counted_in_levels_of_lists_and_objects(leaf: Any, levels: int) -> None:
    assert not nesting_exceeds(_nested(200 - levels, leaf), 200)
    assert nesting_exceeds(_nested(201 - levels, leaf), 200)
    assert nesting_exceeds(_nested(1000, leaf), 200)
    assert not nesting_exceeds({"a": _nested(199 - levels, leaf), "b": [_nested(197, {})]}, 200)
    assert nesting_exceeds({"a": _nested(199 - levels, leaf), "b": [1, _nested(198, [])]}, 200)


def test_a_wide_body_is_measured_whole() -> None:
    # a 64 MB body holds 21,000,000 empty lists (walking them in Python took 21 s, during
    # which the gateway answered nobody; orjson writes them in 0.2 s): one deep branch
    # anywhere among them is found
    wide: Any = {"a": [[] for _ in range(3_000_000)]}
    assert not nesting_exceeds(wide, 200)
    wide["a"].insert(1_500_000, _nested(300, 1))
    assert nesting_exceeds(wide, 200)
