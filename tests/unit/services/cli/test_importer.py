from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import httpx
import orjson
import pytest

from schemas.api import Item, RegisterReq
from services.cli.importer import (
    LineError,
    item_from_fine_tuning,
    item_from_line,
    make_batches,
    register_body,
    rejected_lines,
    retry_after_s,
)

ITEM = b'{"input":{"messages":[{"role":"user","content":"hi"}]}}'


def _line(n: int) -> bytes:
    return b'{"input":{"messages":[{"role":"user","content":"q%d"}]}}\n' % n


def test_an_item_line_is_sent_as_its_own_bytes() -> None:
    assert item_from_line(1, ITEM) is ITEM


@pytest.mark.parametrize(
    ("raw", "kind"),
    [
        pytest.param(b"{not json", "json_invalid", id="not-json"),
        pytest.param(b"[1, 2]", "not_an_object", id="array"),
        pytest.param(b'"text"', "not_an_object", id="string"),
        pytest.param(b"NaN", "json_invalid", id="nan"),
        pytest.param(
            b'{"messages": [{"role": "user", "content": "q"}]}',
            "fine_tuning_line",
            id="fine-tuning-without-answer",
        ),
    ],
)
def test_a_line_that_is_no_item_is_an_error_of_its_line(raw: bytes, kind: str) -> None:
    error = item_from_line(7, raw)
    assert isinstance(error, LineError)
    assert (error.line, error.type) == (7, kind)


def test_a_fine_tuning_line_becomes_input_before_and_output_last() -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ]
    line = {
        "messages": messages,
        "tools": tools,
        "parallel_tool_calls": False,
    }
    item = item_from_fine_tuning(line)
    assert item == {
        "input": {
            "messages": messages[:2],
            "tools": tools,
            "parallel_tool_calls": False,
        },
        "output": {
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Paris."}}]
        },
    }
    Item.model_validate(item, strict=True)  # the spec's item, as the gateway checks it
    sent = item_from_line(3, orjson.dumps(line))
    assert isinstance(sent, bytes)
    assert orjson.loads(sent) == item


@pytest.mark.parametrize(
    ("line", "message"),
    [
        pytest.param(
            {"messages": [{"role": "user", "content": "q"}, {"role": "user"}]},
            "not the assistant's",
            id="last-is-user",
        ),
        pytest.param(
            {"messages": [{"role": "assistant", "content": "a"}]},
            "messages must be",
            id="no-prompt",
        ),
        pytest.param({"messages": "hi"}, "messages must be", id="not-a-list"),
        pytest.param(
            {"messages": [{"role": "user"}, "a"]}, "not the assistant's", id="last-not-an-object"
        ),
        pytest.param(
            {"messages": [{"role": "user"}, {"role": "assistant"}], "weight": 1},
            "not ['weight']",
            id="other-keys",
        ),
    ],
)
def test_a_fine_tuning_line_that_does_not_map_says_why(line: dict[str, Any], message: str) -> None:
    found = item_from_fine_tuning(line)
    assert isinstance(found, str)
    assert message in found


def test_a_line_with_input_is_an_item_even_with_messages() -> None:
    raw = b'{"input": {"messages": []}, "messages": []}'
    assert item_from_line(1, raw) is raw  # the gateway judges it (an unknown key)


def test_the_body_is_the_spec_request_with_the_items_as_given() -> None:
    body = register_body('a "quoted" container', [ITEM, ITEM])
    request = RegisterReq.model_validate_json(body)
    assert request.container == 'a "quoted" container'
    assert len(request.items) == 2
    assert orjson.loads(register_body("c", [])) == {"container": "c", "items": []}


def test_batches_hold_at_most_so_many_items_and_cover_every_line() -> None:
    lines = [_line(n) for n in range(1, 12)]
    batches = list(make_batches(lines, max_items=4, max_bytes=1 << 20))
    assert [b.lines for b in batches] == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11]]
    assert [(b.first, b.end) for b in batches] == [(1, 5), (5, 9), (9, 12)]
    assert batches[0].items[0] == _line(1).strip()


def test_batches_stay_within_the_bytes_with_the_envelope() -> None:
    lines = [_line(n) for n in range(1, 11)]
    size = len(_line(1).strip()) + 1  # an item and its comma
    overhead = len(register_body("c", []))
    batches = list(
        make_batches(lines, max_items=100, max_bytes=overhead + 3 * size, overhead=overhead)
    )
    assert [len(b.items) for b in batches] == [3, 3, 3, 1]
    for batch in batches:
        assert len(register_body("c", batch.items)) <= overhead + 3 * size
    # an item larger than the bytes goes alone, not dropped
    alone = list(make_batches(lines[:3], max_items=100, max_bytes=10))
    assert [b.lines for b in alone] == [[1], [2], [3]]


def test_bad_and_blank_lines_keep_their_numbers_and_resume_skips_lines() -> None:
    lines = [_line(1), b"\n", b"oops\n", _line(4), b"  \r\n", b"[]\n", _line(7)]
    batches = list(make_batches(lines, max_items=2, max_bytes=1 << 20))
    assert [b.lines for b in batches] == [[1, 4], [7]]
    assert [[e.line for e in b.bad] for b in batches] == [[3], [6]]
    assert [(b.first, b.end) for b in batches] == [(1, 5), (5, 8)]
    resumed = list(make_batches(lines, start=4, max_items=10, max_bytes=1 << 20))
    assert [b.lines for b in resumed] == [[4, 7]]
    assert resumed[0].first == 4
    only_bad = list(make_batches([b"x\n", b"y\n", b"z\n"], max_items=2, max_bytes=1 << 20))
    assert [[e.line for e in b.bad] for b in only_bad] == [[1, 2], [3]]
    assert list(make_batches([b"\n"], max_items=2, max_bytes=1 << 20)) == []


def test_a_byte_order_mark_on_the_first_line_is_not_bad_json() -> None:
    batches = list(make_batches([b"\xef\xbb\xbf" + _line(1)], max_items=2, max_bytes=1 << 20))
    assert batches[0].lines == [1]
    assert not batches[0].bad


def test_a_response_error_is_mapped_to_the_line_of_its_item() -> None:
    errors = [
        {"index": 0, "loc": ["items", 0, "input"], "message": "Field required", "type": "missing"},
        {"index": 2, "loc": ["items", 2], "message": "too deep", "type": "value_error"},
    ]
    found = rejected_lines([10, 12, 15], errors)
    assert [e.record() for e in found] == [
        {"line": 10, "loc": ["input"], "message": "Field required", "type": "missing"},
        {"line": 15, "loc": [], "message": "too deep", "type": "value_error"},
    ]


IN_30_S = "in 30 s"


@pytest.mark.parametrize(
    ("header", "low", "high"),
    [
        pytest.param("3", 3, 3, id="seconds"),
        pytest.param("600", 60, 60, id="at-most-a-minute"),
        # what a proxy or load balancer in front of the gateway may send with its 503
        pytest.param(IN_30_S, 28, 30, id="http-date"),
        pytest.param("nan", 0.5, 0.5, id="not-a-number"),
        pytest.param("soon", 0.5, 0.5, id="neither"),
        pytest.param(None, 0.5, 0.5, id="none"),
    ],
)
def test_retry_after_in_seconds_or_as_a_date(header: str | None, low: float, high: float) -> None:
    if header == IN_30_S:
        header = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    headers = {} if header is None else {"Retry-After": header}
    assert low <= retry_after_s(httpx.Response(503, headers=headers), 0.5) <= high
