from __future__ import annotations

from typing import Any

import pytest
from openai.types.chat import ChatCompletionChunk

from schemas.api import ChatRes, RegisterOutputMessage
from services.gateway.shaping import (
    StreamAccumulator,
    chat_res,
    completion_chunks,
    finish_reason,
    spec_message,
)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("stop", "stop"),
        ("length", "length"),
        ("tool_calls", "tool_calls"),
        ("function_call", "tool_calls"),
        ("end_turn", "stop"),
        ("something_new", None),
        (None, None),
        (3, None),
    ],
)
def test_finish_reason(value: Any, expected: str | None) -> None:
    assert finish_reason(value) == expected


def test_chat_res_drops_fields_the_spec_forbids_and_validates() -> None:
    upstream = {
        "id": "up-1",
        "created": 123,
        "model": "gpt",
        "system_fingerprint": "fp",
        "service_tier": "default",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "hi", "reasoning": "r"},
                "finish_reason": "stop",
                "native_finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2, "cost": 0.1},
    }
    result = chat_res(
        upstream, completion_id="c-1", model="p/gpt", provider="p", container=None, created=9
    )
    validated = ChatRes.model_validate(result)
    assert validated.id == "c-1"
    assert validated.model == "p/gpt"
    assert validated.created == 123
    assert validated.choices[0].message.model_extra == {"reasoning": "r"}
    assert result["usage"]["cost"] == 0.1


def test_chat_res_replaces_an_upstream_null_index_or_role_with_the_defaults() -> None:
    upstream = {
        "choices": [
            {"index": None, "message": {"role": None, "content": "x"}},
            {"message": {"content": "y"}},
        ]
    }
    result = chat_res(
        upstream, completion_id="c", model="m", provider="p", container=None, created=5
    )
    choices = ChatRes.model_validate(result).choices
    assert [(c.index, c.message.role, c.message.content) for c in choices] == [
        (0, "assistant", "x"),
        (1, "assistant", "y"),
    ]


NOW = 1_700_000_000


@pytest.mark.parametrize(
    ("upstream", "created"),
    [
        (NOW - 60, NOW - 60),
        (NOW + 0.5, NOW + 0.5),
        (NOW - 86_400, NOW - 86_400),
        (None, NOW),
        ("1", NOW),
        (True, NOW),
        (float("nan"), NOW),
        (-1, NOW),
        (1, NOW),  # a clock far off
        (NOW * 1000, NOW),  # milliseconds
        (NOW + 86_401, NOW),
    ],
)
def test_chat_res_keeps_the_upstreams_creation_time_when_it_is_plausible(
    upstream: object, created: float
) -> None:
    result = chat_res(
        {"created": upstream},
        completion_id="c",
        model="m",
        provider="p",
        container=None,
        created=NOW,
    )
    assert result["created"] == created
    assert ChatRes.model_validate(result).created == created


USAGE = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


@pytest.mark.parametrize(
    ("usage", "kept"),
    [
        (USAGE, True),
        ({**USAGE, "prompt_tokens_details": {"cached_tokens": 1}}, True),
        ({**USAGE, "prompt_tokens": "3"}, False),
        ({**USAGE, "total_tokens": True}, False),
        ({"prompt_tokens": 3, "completion_tokens": 2}, False),
        ({**USAGE, "completion_tokens": 10**13}, False),
        ({**USAGE, "prompt_tokens_details": {"cached_tokens": "1"}}, False),
        ({**USAGE, "prompt_tokens_details": "x"}, False),
        ({**USAGE, "completion_tokens_details": [1]}, False),
        ({**USAGE, "prompt_tokens_details": []}, False),  # empty, but no object either
        ({**USAGE, "completion_tokens_details": ""}, False),
        ({**USAGE, "prompt_tokens_details": 0}, False),
        ({**USAGE, "completion_tokens_details": None}, True),
        ([3, 2, 5], False),
    ],
)
def test_usage_a_record_cannot_hold_is_left_out(usage: Any, kept: bool) -> None:
    result = chat_res(
        {"usage": usage}, completion_id="c", model="m", provider="p", container=None, created=5
    )
    assert result["usage"] == (usage if kept else None)
    ChatRes.model_validate(result)


def test_a_whole_completion_as_chunks_assembles_to_itself() -> None:
    message = {
        "role": "assistant",
        "content": "Hi",
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
        ],
    }
    result = chat_res(
        {"choices": [{"message": message, "finish_reason": "tool_calls"}], "usage": USAGE},
        completion_id="c",
        model="m",
        provider="p",
        container=None,
        created=5,
    )
    acc = StreamAccumulator()
    chunks = completion_chunks(result)
    for chunk in chunks:
        acc.add(chunk)
    assert acc.choices() == result["choices"]
    assert acc.usage == USAGE
    # what the openai SDK requires of a chunk: tool calls numbered
    [delta_call] = chunks[0]["choices"][0]["delta"]["tool_calls"]
    assert delta_call["index"] == 0
    for chunk in chunks:
        ChatCompletionChunk.model_validate({**chunk, "object": "chat.completion.chunk"})


def test_chat_res_from_an_empty_body_is_still_valid() -> None:
    result = chat_res({}, completion_id="c", model="m", provider="p", container="c", created=5)
    assert ChatRes.model_validate(result).created == 5


def _chunk(delta: dict[str, Any], finish: str | None = None, index: int = 0) -> dict[str, Any]:
    return {
        "id": "up",
        "created": 7,
        "choices": [{"index": index, "delta": delta, "finish_reason": finish}],
    }


def test_accumulator_assembles_content_tool_calls_and_usage() -> None:
    acc = StreamAccumulator()
    acc.add(_chunk({"role": "assistant", "content": ""}))
    acc.add(_chunk({"content": "Hel"}))
    acc.add(_chunk({"content": "lo"}))
    acc.add(_chunk({"content": "other"}, index=1))
    call = {
        "index": 0,
        "id": "call_1",
        "type": "function",
        "function": {"name": "get", "arguments": ""},
    }
    acc.add(_chunk({"tool_calls": [call]}))
    acc.add(_chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"a":'}}]}))
    acc.add(_chunk({"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]}))
    acc.add(_chunk({}, finish="tool_calls"))
    acc.add(
        {
            "id": "up",
            "choices": [],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
        }
    )
    first, second = acc.choices()
    assert first["message"]["content"] == "Hello"
    assert first["message"]["tool_calls"] == [
        {"id": "call_1", "type": "function", "function": {"name": "get", "arguments": '{"a":1}'}}
    ]
    assert first["finish_reason"] == "tool_calls"
    assert second["message"]["content"] == "other"
    assert second["finish_reason"] is None
    assert acc.usage == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert acc.created == 7
    assert acc.chunks == 9


def test_accumulator_ignores_malformed_chunks() -> None:
    acc = StreamAccumulator()
    acc.add({"choices": ["nonsense", {"delta": "x"}, {"index": 0, "delta": {"content": 5}}]})
    assert acc.choices() == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": None},
            "finish_reason": None,
            "logprobs": None,
        }
    ]


def test_accumulator_keeps_reasoning_text_and_logprobs() -> None:
    acc = StreamAccumulator()
    for word in ("Hel", "lo"):
        acc.add(_chunk({"reasoning_content": "r.", "reasoning": "s."}))
        chunk = _chunk({"content": word})
        chunk["choices"][0]["logprobs"] = {"content": [{"token": word}], "refusal": None}
        acc.add(chunk)
    [choice] = acc.choices()
    assert choice["message"] == {
        "role": "assistant",
        "content": "Hello",
        "reasoning": "s.s.",
        "reasoning_content": "r.r.",
    }
    assert choice["logprobs"] == {"content": [{"token": "Hel"}, {"token": "lo"}]}


def test_accumulator_survives_chunks_of_the_wrong_shape() -> None:
    acc = StreamAccumulator()
    acc.add({"choices": 7})
    acc.add(_chunk({"tool_calls": 5}))
    call = {"index": 0, "id": "c0", "function": {"name": "f", "arguments": "{}"}}
    acc.add(_chunk({"tool_calls": [call]}))
    acc.add(_chunk({"tool_calls": [{**call, "index": "1", "id": "c1"}]}))
    acc.add(_chunk({"content": "x"}, index="1"))  # type: ignore[arg-type]
    [choice] = acc.choices()
    assert [c["id"] for c in choice["message"]["tool_calls"]] == ["c0", "c1"]
    assert choice["message"]["content"] == "x"
    ChatRes.model_validate(
        {"id": "c", "created": 1, "model": "m", "choices": acc.choices(), "usage": None}
    )


def test_message_fields_of_the_wrong_type_are_left_out() -> None:
    message = {
        "role": None,
        "content": "hi",
        "refusal": 5,
        "tool_calls": [{"id": 1, "function": {"name": "f", "arguments": "{}"}}],
        "audio": {"x": 1},
        "annotations": [{"type": "url_citation"}],
    }
    assert spec_message(message) == {
        "role": "assistant",
        "content": "hi",
        "annotations": [{"type": "url_citation"}],
    }


@pytest.mark.parametrize(
    ("content", "kept"),
    [
        ("hi", True),
        ([{"type": "text", "text": "hi"}], True),
        (None, True),
        ({"type": "text", "text": "hi"}, False),
        (5, False),
        (True, False),
    ],
)
def test_content_the_record_cannot_hold_is_left_out(content: Any, kept: bool) -> None:
    """The record's message (the spec's RegisterOutputMessage) holds text, parts or null."""
    message = spec_message({"role": "assistant", "content": content})
    assert message == ({"role": "assistant", "content": content} if kept else {"role": "assistant"})
    RegisterOutputMessage.model_validate(message, strict=True)
