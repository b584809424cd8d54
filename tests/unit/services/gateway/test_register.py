from __future__ import annotations

from typing import Any

import orjson
import pytest

from schemas.events import CompletionEvent
from services.gateway.register import MAX_ERRORS, RegisterEnvelope, build_events

GOOD: dict[str, Any] = {"input": {"messages": [{"role": "user", "content": "hi"}]}}


def _build(items: list[Any], container: str = "c") -> Any:
    envelope = RegisterEnvelope(items=items, container=container)
    return build_events(envelope, project="p", received_at_ms=1_700_000_000_000)


def test_valid_items_become_events_keyed_by_completion() -> None:
    items = [GOOD, {**GOOD, "output": {"id": "given-id", "choices": []}}]
    result = _build(items)
    assert result.rejected == 0
    assert result.errors == []
    events = [CompletionEvent.model_validate(orjson.loads(v)) for _, v in result.messages]
    assert events[1].completion_id == "given-id"
    assert events[0].completion_id.startswith("chatcmpl-")
    assert [k for k, _ in result.messages] == [f"p/{e.completion_id}".encode() for e in events]
    assert all(e.project == "p" and e.container == "c" and e.kind == "register" for e in events)
    assert events[0].item == GOOD


@pytest.mark.parametrize(
    ("item", "loc", "kind"),
    [
        pytest.param("not an object", ["items", 0], "model_type", id="not-object"),
        pytest.param({}, ["items", 0, "input"], "missing", id="no-input"),
        pytest.param({**GOOD, "extra": 1}, ["items", 0, "extra"], "extra_forbidden", id="extra"),
        pytest.param(
            {"input": {"messages": [{"role": "robot"}]}},
            ["items", 0, "input", "messages", 0, "role"],
            "literal_error",
            id="bad-role",
        ),
        pytest.param(
            {**GOOD, "output": {"choices": [], "created": "soon"}},
            ["items", 0, "output", "created"],
            "value_error",
            id="bad-created",
        ),
        pytest.param(
            {
                **GOOD,
                "output": {
                    "choices": [],
                    "usage": {"prompt_tokens": -1, "completion_tokens": 0, "total_tokens": 0},
                },
            },
            ["items", 0, "output", "usage", "prompt_tokens"],
            "value_error",
            id="negative-tokens",
        ),
        pytest.param(
            {
                **GOOD,
                "output": {
                    "choices": [],
                    "usage": {"prompt_tokens": 1e30, "completion_tokens": 0, "total_tokens": 0},
                },
            },
            ["items", 0, "output", "usage", "prompt_tokens"],
            "value_error",
            id="too-many-tokens",
        ),
        # Found by fuzzing: lax validation let `false` through as an index; stored as given,
        # the record then broke the spec whenever it was listed or fetched.
        pytest.param(
            {**GOOD, "output": {"choices": [{"index": False, "message": {"role": "assistant"}}]}},
            ["items", 0, "output", "choices", 0, "index"],
            "int_type",
            id="bool-index",
        ),
        pytest.param(
            {**GOOD, "output": {"choices": [], "spend": "0.5"}},
            ["items", 0, "output", "spend"],
            "float_type",
            id="string-spend",
        ),
        pytest.param(
            {**GOOD, "output": {"choices": [], "spend": 1e30}},
            ["items", 0, "output", "spend"],
            "value_error",
            id="spend-too-large",
        ),
    ],
)
def test_invalid_item_is_reported_with_location(item: Any, loc: list[Any], kind: str) -> None:
    result = _build([item])
    assert result.messages == []
    assert result.rejected == 1
    [error] = result.errors
    assert error["index"] == 0
    assert error["loc"] == loc
    assert error["type"] == kind
    assert error["message"]


def test_invalid_items_do_not_block_valid_ones() -> None:
    result = _build([GOOD, {"bad": True}, GOOD | {"tags": ["x"]}])
    assert len(result.messages) == 2
    assert [e["index"] for e in result.errors] == [1]


def test_each_invalid_item_is_reported_at_its_own_index_with_its_own_errors() -> None:
    two_errors = {"input": {"messages": [{"role": "robot", "name": 1}]}}
    items = [GOOD, "text", GOOD, two_errors, {**GOOD, "output": {"choices": [], "spend": 1e30}}]
    result = _build(items)
    assert result.accepted == 2
    assert len(result.messages) == 1  # the same item twice: one completion, published once
    assert result.rejected == 3
    assert [(e["index"], e["loc"], e["type"]) for e in result.errors] == [
        (1, ["items", 1], "model_type"),
        (3, ["items", 3, "input", "messages", 0, "role"], "literal_error"),
        (4, ["items", 4, "output", "spend"], "value_error"),
    ]
    assert result.errors[1]["message"].endswith("(+1)")  # the second error of that item


def test_errors_are_capped_but_rejections_counted() -> None:
    result = _build([{"bad": i} for i in range(MAX_ERRORS + 50)])
    assert result.rejected == MAX_ERRORS + 50
    assert len(result.errors) == MAX_ERRORS


def test_same_item_same_id_in_same_container_only() -> None:
    first = _build([GOOD]).messages[0][0]
    assert _build([GOOD]).messages[0][0] == first
    assert _build([GOOD], container="other").messages[0][0] != first
