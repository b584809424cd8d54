"""decode -> validate -> transform, the pure per-message steps."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import orjson
import pytest

from schemas import COMPLETIONS_INSERT_COLUMNS, SCHEMAS_DIR
from schemas.api import ChatResRelaxed
from schemas.events import CompletionEvent, encode_event
from services.gateway.register import RegisterEnvelope, build_events
from services.worker.pipeline import process
from services.worker.pipeline.decode import decode
from services.worker.pipeline.types import Invalid, Row

EXAMPLES = sorted((SCHEMAS_DIR / "examples").glob("*.json"))


def _event(item: dict[str, Any], **overrides: Any) -> bytes:
    fields: dict[str, Any] = {
        "kind": "register",
        "project": "p",
        "container": "c",
        "completion_id": "id-1",
        "received_at_ms": 1_700_000_000_000,
        "item": item,
    }
    fields.update(overrides)
    return encode_event(**fields)


def _row(value: bytes) -> dict[str, Any]:
    """The row as ClickHouse stores it: ``response`` and ``request`` as their JSON text."""
    result = process(value)
    assert isinstance(result, Row), result
    row = dict(zip(COMPLETIONS_INSERT_COLUMNS, orjson.loads(result.json), strict=True))
    for column in ("response", "request"):
        assert isinstance(row[column], dict)  # written as an object, stored as its text
        row[column] = orjson.dumps(row[column]).decode()
    return row


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_every_example_goes_through_every_step(path: Any) -> None:
    body = json.loads(path.read_text())
    envelope = RegisterEnvelope.model_validate(body)
    validated = build_events(envelope, project="p", received_at_ms=1_700_000_000_000)
    assert validated.errors == []
    for _, value in validated.messages:
        row = _row(value)
        response = ChatResRelaxed.model_validate(orjson.loads(row["response"]))
        assert response.container == body["container"]
        assert response.id == row["completion_id"]


def test_row_columns_from_a_full_completion() -> None:
    body = json.loads((SCHEMAS_DIR / "examples" / "register_full.json").read_text())
    row = _row(_event(body["items"][0], completion_id="chatcmpl-example-full"))
    assert row["created"] == "2024-11-25 02:00:00.000"
    assert row["model"] == "openai/gpt-4o"
    assert row["provider"] == "openai"
    assert row["container"] == "c"
    assert row["finish_reason"] == "stop"
    assert (row["prompt_tokens"], row["completion_tokens"], row["total_tokens"]) == (21, 1, 22)
    assert (row["cached_tokens"], row["reasoning_tokens"]) == (8, 0)
    assert Decimal(str(row["spend"])) == Decimal("0.0000535")
    assert row["tags"] == ["math", "eval"]
    assert row["trace_id"] == "trace-1"
    response = orjson.loads(row["response"])
    assert response["metadata"] == {"customer": "acme", "split": "train"}
    assert response["trace"]["span_id"] == "span-1"
    assert orjson.loads(row["request"])["temperature"] == 0.2


def test_input_only_item_is_created_when_received() -> None:
    row = _row(_event({"input": {"messages": [], "model": "openai:gpt-4o-mini"}}))
    assert row["created"] == "2023-11-14 22:13:20.000"
    assert row["model"] == "openai/gpt-4o-mini"
    response = orjson.loads(row["response"])
    assert response["choices"] == []
    assert response["created"] == 1700000000
    assert response["model"] == "openai:gpt-4o-mini"  # as the client wrote it


def test_the_response_says_the_creation_time_the_column_holds() -> None:
    # the column holds milliseconds: the hour the aggregates count it in is the one shown
    row = _row(_event({"input": {"messages": []}, "output": {"created": 1200002399.9996}}))
    assert row["created"] == "2008-01-10 22:00:00.000"
    assert orjson.loads(row["response"])["created"] == 1200002400
    row = _row(_event({"input": {"messages": []}, "output": {"created": 1200002399.25}}))
    assert orjson.loads(row["response"])["created"] == 1200002399.25


def test_a_callers_spend_is_kept_to_the_columns_twelve_places_in_the_response_too() -> None:
    item = {"input": {"messages": []}, "output": {"choices": [], "spend": "0.1234567890125"}}
    row = _row(_event(item))
    assert Decimal(str(row["spend"])) == Decimal("0.123456789012")
    assert orjson.loads(row["response"])["spend"] == 0.123456789012


def test_spend_is_written_as_an_exact_decimal() -> None:
    item = {"input": {"messages": []}, "output": {"choices": [], "spend": 0.000000000123}}
    result = process(_event(item))
    assert isinstance(result, Row)
    # the spend column and the response's spend, both exact
    assert COMPLETIONS_INSERT_COLUMNS.index("spend_source") == (
        COMPLETIONS_INSERT_COLUMNS.index("spend") + 1
    )
    assert b',0.000000000123,"caller",' in result.json
    assert b'"spend":0.000000000123,' in result.json


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        pytest.param(None, "empty message", id="tombstone"),
        pytest.param(b"\xff\x00", "not JSON", id="binary"),
        pytest.param(b"[1,2]", "not a JSON object", id="array"),
        pytest.param(b'{"v": 99}', "unknown event version", id="future-version"),
        pytest.param(b'{"v": 1, "kind": "register"}', "invalid event at project", id="missing"),
        pytest.param(
            _event({"input": {}, "output": {"created": "never"}}),
            "output.created",
            id="bad-created",
        ),
        pytest.param(
            _event({"input": {}, "output": {"spend": "lots"}}), "output.spend", id="bad-spend"
        ),
        # Beyond Decimal(38, 12): the insert would fail on every retry and stall the partition.
        pytest.param(
            _event({"input": {}, "output": {"spend": 1e30}}), "output.spend", id="huge-spend"
        ),
        # Beyond 64 bits: the row could not even be encoded.
        pytest.param(
            _event(
                {
                    "input": {},
                    "output": {
                        "usage": {"prompt_tokens": 1e30, "completion_tokens": 0, "total_tokens": 0}
                    },
                }
            ),
            "output.usage.prompt_tokens",
            id="huge-tokens",
        ),
    ],
)
def test_poison_messages_are_invalid_with_a_reason(value: bytes | None, reason: str) -> None:
    result = process(value)
    assert isinstance(result, Invalid)
    assert reason in result.reason


def test_an_event_as_the_gateway_writes_it_decodes_as_the_model_validates_it() -> None:
    body = json.loads((SCHEMAS_DIR / "examples" / "register_full.json").read_text())
    value = _event(body["items"][0])
    event = decode(value)
    assert isinstance(event, CompletionEvent)
    assert event == CompletionEvent.model_validate(orjson.loads(value))


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        pytest.param({"received_at_ms": "1700000000000"}, 1_700_000_000_000, id="numeric-string"),
        pytest.param({"received_at_ms": 1_700_000_000_000.0}, 1_700_000_000_000, id="whole-float"),
    ],
)
def test_other_events_the_model_accepts_are_still_accepted(
    overrides: dict[str, Any], expected: int
) -> None:
    raw = orjson.loads(_event({"input": {"messages": []}}))
    event = decode(orjson.dumps({**raw, **overrides}))
    assert isinstance(event, CompletionEvent)
    assert event.received_at_ms == expected


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        pytest.param({"project": ""}, "invalid event at project", id="empty-project"),
        pytest.param({"container": 3}, "invalid event at container", id="container-number"),
        pytest.param({"received_at_ms": -1}, "invalid event at received_at_ms", id="negative"),
        pytest.param({"item": []}, "invalid event at item", id="item-list"),
        pytest.param({"kind": "other"}, "invalid event at kind", id="kind"),
        pytest.param({"extra": 1}, "invalid event at extra", id="extra-field"),
    ],
)
def test_envelopes_the_model_refuses_are_refused(overrides: dict[str, Any], reason: str) -> None:
    raw = orjson.loads(_event({"input": {"messages": []}}))
    result = process(orjson.dumps({**raw, **overrides}))
    assert isinstance(result, Invalid)
    assert reason in result.reason
