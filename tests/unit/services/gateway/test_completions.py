from __future__ import annotations

from typing import Any

import pytest

from schemas.api import ChatReq
from services.common.errors import BadRequest
from services.gateway.completions import candidate_models, upstream_body
from services.gateway.providers import Provider, Route

ROUTE = Route(Provider("openai", "https://x/v1"), "gpt-4o", "openai/gpt-4o")


@pytest.mark.parametrize(
    ("model", "models", "expected"),
    [
        ("a/x", None, ["a/x"]),
        ("a/x", ["b/y", "a:x", "c/z"], ["a/x", "b/y", "c/z"]),
        (None, ["b/y"], ["b/y"]),
        ("", ["b/y", " "], ["b/y"]),
    ],
)
def test_candidate_models(model: str | None, models: list[str] | None, expected: list[str]) -> None:
    assert candidate_models(ChatReq(messages=[], model=model, models=models)) == expected


def test_a_model_is_required() -> None:
    with pytest.raises(BadRequest):
        candidate_models(ChatReq(messages=[]))


def test_upstream_body_keeps_everything_but_gateway_fields() -> None:
    raw: dict[str, Any] = {
        "model": "openai/gpt-4o",
        "models": ["x/y"],
        "messages": [{"role": "user", "content": "hi"}],
        "tags": ["t"],
        "store": True,
        "trace": {"id": "t"},
        "metadata": {"a": 1},
        "tools": [{"type": "function", "function": {"name": "f"}}],
        "seed": 1,
        "transforms": ["middle-out"],
        "stream": True,
        "stream_options": {"include_usage": False},
    }
    body = upstream_body(raw, ROUTE, force_usage=True)
    assert body == {
        "model": "gpt-4o",
        "messages": raw["messages"],
        "tools": raw["tools"],
        "seed": 1,
        "transforms": ["middle-out"],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    assert raw["stream_options"] == {"include_usage": False}  # the caller's request is untouched
    assert "stream_options" not in upstream_body({"messages": []}, ROUTE, force_usage=False)
