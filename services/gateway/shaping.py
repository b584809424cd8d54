"""Pure functions that shape upstream answers into the spec's ``ChatRes`` and assemble streams."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, TypeGuard

from pydantic import ValidationError

from schemas.api import ChatResponseMessage, ChatResponseUsage, RegisterOutputMessage
from services.common.records import RecordError, usage_counts

FINISH_REASONS = {"stop", "length", "tool_calls", "content_filter", "error"}
_FINISH_ALIASES = {"function_call": "tool_calls", "end_turn": "stop", "max_tokens": "length"}


def finish_reason(value: Any) -> str | None:
    """An upstream finish reason as one of the spec's values (None when unknown or absent)."""
    if not isinstance(value, str):
        return None
    value = _FINISH_ALIASES.get(value, value)
    return value if value in FINISH_REASONS else None


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def spec_message(message: dict[str, Any]) -> dict[str, Any]:
    """An upstream's message as the spec's ``ChatResponseMessage`` and, since the answer is
    recorded, as its ``RegisterOutputMessage`` (what list and get return: a content that is
    text, parts or null): a field of the wrong type (a numeric ``refusal``, a tool call without
    an ``id``, an object for content) is left out, the rest kept as sent; a missing or null
    role is the assistant's."""
    role = message.get("role")
    message = {**message, "role": role if isinstance(role, str) else "assistant"}
    for model in (ChatResponseMessage, RegisterOutputMessage):
        try:
            model.model_validate(message, strict=True)
        except ValidationError as exc:
            wrong = {error["loc"][0] for error in exc.errors(include_url=False) if error["loc"]}
            message = {key: value for key, value in message.items() if key not in wrong}
    return message


def _choice(choice: dict[str, Any], position: int) -> dict[str, Any]:
    message = choice.get("message") if isinstance(choice.get("message"), dict) else {}
    assert isinstance(message, dict)
    index = choice.get("index")
    return {  # an upstream's null index would break the spec: the default instead
        "index": index if _is_int(index) else position,
        "message": spec_message(message),
        "finish_reason": finish_reason(choice.get("finish_reason")),
        "logprobs": choice.get("logprobs"),
    }


CREATED_SLACK_S = 86_400


def created_at(value: Any, default: int) -> int | float:
    """The upstream's creation time (the spec's ``number``: fractions kept) if it is one and
    within a day of ``default``, the gateway's own clock; ``default`` otherwise. An upstream
    clock far off (or in milliseconds) would misplace the completion in every list."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return default
    return value if abs(value - default) <= CREATED_SLACK_S else default


def valid_usage(usage: Any) -> dict[str, Any] | None:
    """``usage`` when it is the spec's ``ChatResponseUsage`` (counts that are numbers, details
    that are objects or null) with counts a record can hold; None otherwise (the answer and
    its record keep everything else)."""
    if not isinstance(usage, dict):
        return None
    try:
        ChatResponseUsage.model_validate(usage, strict=True)
        usage_counts(usage)
    except (ValidationError, RecordError):
        return None
    return usage


def chat_res(
    upstream: dict[str, Any],
    *,
    completion_id: str,
    model: str,
    provider: str,
    container: str | None,
    created: int,
) -> dict[str, Any]:
    """A spec-valid ``ChatRes`` from an upstream chat.completion body."""
    choices = upstream.get("choices") if isinstance(upstream.get("choices"), list) else []
    assert isinstance(choices, list)
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created_at(upstream.get("created"), created),
        "model": model,
        "choices": [_choice(c, i) for i, c in enumerate(choices) if isinstance(c, dict)],
        "usage": valid_usage(upstream.get("usage")),
        "provider": provider,
        "container": container,
    }


def completion_chunks(result: dict[str, Any]) -> list[dict[str, Any]]:
    """A ``ChatRes`` as the chunks of a stream: one per choice, then the usage chunk."""
    base = {
        "id": result["id"],
        "object": "chat.completion.chunk",
        "created": result["created"],
        "model": result["model"],
    }
    chunks = [
        {
            **base,
            "choices": [
                {
                    "index": c["index"],
                    "delta": _delta(c["message"]),
                    "finish_reason": c["finish_reason"],
                    "logprobs": c["logprobs"],
                }
            ],
        }
        for c in result["choices"]
    ]
    if result["usage"] is not None:
        chunks.append({**base, "choices": [], "usage": result["usage"]})
    return chunks


def _delta(message: dict[str, Any]) -> dict[str, Any]:
    """A whole message as one delta: its tool calls numbered, as a stream's carry them."""
    calls = message.get("tool_calls")
    if not calls:
        return message
    return {**message, "tool_calls": [{**call, "index": i} for i, call in enumerate(calls)]}


# Text fields of a delta that are concatenated: the spec's, and the reasoning text as
# DeepSeek, vLLM and OpenRouter stream it.
_TEXT_FIELDS = ("content", "refusal", "reasoning", "reasoning_content")


@dataclass
class _ChoiceState:
    role: str | None = None
    texts: dict[str, list[str]] = field(default_factory=dict)
    tool_calls: dict[int, dict[str, Any]] = field(default_factory=dict)
    finish_reason: str | None = None
    logprobs: dict[str, list[Any]] | None = None


@dataclass
class StreamAccumulator:
    """Rebuilds the full completion from ``chat.completion.chunk`` objects as they pass."""

    upstream_id: str | None = None
    created: int | None = None
    usage: dict[str, Any] | None = None
    chunks: int = 0
    _choices: dict[int, _ChoiceState] = field(default_factory=dict)

    def add(self, chunk: dict[str, Any]) -> None:
        self.chunks += 1
        if self.upstream_id is None and isinstance(chunk.get("id"), str):
            self.upstream_id = chunk["id"]
        if self.created is None and isinstance(chunk.get("created"), int):
            self.created = chunk["created"]
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        choices = chunk.get("choices")
        for choice in choices if isinstance(choices, list) else ():
            if isinstance(choice, dict):
                self._add_choice(choice)

    def _add_choice(self, choice: dict[str, Any]) -> None:
        index = choice.get("index", 0)
        state = self._choices.setdefault(index if _is_int(index) else 0, _ChoiceState())
        delta = choice.get("delta") if isinstance(choice.get("delta"), dict) else {}
        assert isinstance(delta, dict)
        if isinstance(delta.get("role"), str):
            state.role = delta["role"]
        for key in _TEXT_FIELDS:
            if isinstance(delta.get(key), str):
                state.texts.setdefault(key, []).append(delta[key])
        calls = delta.get("tool_calls")
        for call in calls if isinstance(calls, list) else ():
            if isinstance(call, dict):
                self._add_tool_call(state, call)
        if choice.get("finish_reason") is not None:
            state.finish_reason = finish_reason(choice["finish_reason"])
        logprobs = choice.get("logprobs")
        if isinstance(logprobs, dict):  # {"content": [...], "refusal": [...]}, a part per chunk
            if state.logprobs is None:
                state.logprobs = {}
            for key, part in logprobs.items():
                if isinstance(part, list):
                    state.logprobs.setdefault(key, []).extend(part)

    @staticmethod
    def _add_tool_call(state: _ChoiceState, call: dict[str, Any]) -> None:
        index = call.get("index")
        position = index if _is_int(index) else len(state.tool_calls)
        current = state.tool_calls.setdefault(
            position, {"id": "", "type": "function", "function": {"name": "", "arguments": ""}}
        )
        if isinstance(call.get("id"), str):
            current["id"] = call["id"]
        function = call.get("function") if isinstance(call.get("function"), dict) else {}
        assert isinstance(function, dict)
        if isinstance(function.get("name"), str):
            current["function"]["name"] += function["name"]
        if isinstance(function.get("arguments"), str):
            current["function"]["arguments"] += function["arguments"]

    def choices(self) -> list[dict[str, Any]]:
        result = []
        for index in sorted(self._choices):
            state = self._choices[index]
            content = state.texts.get("content")
            message: dict[str, Any] = {
                "role": state.role or "assistant",
                "content": "".join(content) if content else None,
            }
            for key in _TEXT_FIELDS[1:]:
                if key in state.texts:
                    message[key] = "".join(state.texts[key])
            if state.tool_calls:
                message["tool_calls"] = [state.tool_calls[i] for i in sorted(state.tool_calls)]
            result.append(
                {
                    "index": index,
                    "message": message,
                    "finish_reason": state.finish_reason,
                    "logprobs": state.logprobs,
                }
            )
        return result
