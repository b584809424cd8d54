"""POST /v1/chat/completions with the official openai SDK against a local upstream."""

from __future__ import annotations

import base64
import json
import os
import time
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI
from prometheus_client import REGISTRY

from schemas.api import ChatListRes, ChatRes, ChatResRelaxed
from tests.conftest import eventually
from tests.e2e.conftest import KEY_A, RunningStack
from tests.support.upstream import ANSWER

TOOLS: Any = [
    {
        "type": "function",
        "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}},
    }
]


def _sdk(api: RunningStack, key: str = "key-a") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{api.base_url}/v1", api_key=key, max_retries=0)


HI: Any = [{"role": "user", "content": "hi"}]


async def _completed(api: RunningStack, model: str, **kwargs: Any) -> Any:
    """What the SDK answers for a completion of ``model`` asked "hi"."""
    async with _sdk(api) as sdk:
        return await sdk.chat.completions.create(model=model, messages=HI, **kwargs)


async def _streamed(api: RunningStack, model: str, **kwargs: Any) -> list[Any]:
    """The chunks the SDK reads of a streamed completion of ``model`` asked "hi"."""
    async with _sdk(api) as sdk:
        stream = await sdk.chat.completions.create(model=model, messages=HI, stream=True, **kwargs)
        return [chunk async for chunk in stream]


async def _create(api: RunningStack, model: str) -> httpx.Response:
    async with api.client(KEY_A) as client:
        return await client.post("/v1/chat/completions", json={"model": model, "messages": []})


async def _recorded(api: RunningStack, completion_id: str) -> dict[str, Any]:
    found: dict[str, Any] = {}
    async with api.client(KEY_A) as client:

        async def check() -> bool:
            nonlocal found
            response = await client.get(f"/v1/chat/completions/{completion_id}")
            if response.status_code == 200:
                found = response.json()
            return response.status_code == 200

        await eventually(check)
    return found


async def _settled_total(api: RunningStack) -> int:
    """The list total once every record the gateway published is stored."""
    assert api.stack.publisher is not None
    assert api.stack.worker is not None
    await api.stack.publisher.flush()
    assert await api.stack.worker.drain(dict(api.stack.publisher.acked), 20)
    async with api.client(KEY_A) as client:
        return int((await client.get("/v1/chat/completions")).json()["total"])


async def test_non_streaming_completion_is_answered_and_recorded(
    api: RunningStack, upstream: tuple[FastAPI, str]
) -> None:
    async with _sdk(api) as sdk:
        completion = await sdk.chat.completions.create(
            model="mock/ok",
            messages=[{"role": "user", "content": "Say something"}],
            temperature=0.3,
            seed=7,
            n=1,
            logprobs=False,
            tools=TOOLS,
            tool_choice="auto",
            response_format={"type": "json_object"},
            extra_body={
                "tags": ["demo"],
                "metadata": {"user": "u1"},
                "trace": {"id": "t-1", "span_id": "s-1"},
                "reasoning": {"effort": "low"},
                "modalities": ["text"],
                "models": ["mock/ok"],
            },
        )
    assert completion.choices[0].message.content == ANSWER
    assert completion.model == "mock/ok"
    assert completion.id.startswith("chatcmpl-")
    assert completion.usage is not None
    assert completion.usage.completion_tokens == len(ANSWER.split())

    sent = upstream[0].state.requests[-1]["body"]
    assert sent["model"] == "ok"
    for key in (
        "temperature",
        "seed",
        "n",
        "logprobs",
        "tools",
        "tool_choice",
        "response_format",
        "reasoning",
        "modalities",
    ):
        assert key in sent, key
    assert sent["reasoning"] == {"effort": "low"}
    assert not {"models", "tags", "store", "trace", "metadata"} & set(sent)

    record = await _recorded(api, completion.id)
    assert record["model"] == "mock/ok"
    assert record["provider"] == "mock"
    assert record["tags"] == ["demo"]
    assert record["metadata"] == {"user": "u1"}
    assert record["trace"]["id"] == "t-1"
    assert record["choices"][0]["message"]["content"] == ANSWER
    assert record["usage"]["total_tokens"] == completion.usage.total_tokens
    operation = record["operation"]
    assert operation["status"] == "ok"
    assert operation["ttft_ms"] > 0
    assert operation["latency_ms"] >= operation["ttft_ms"]
    assert [a["outcome"] for a in operation["attempts"]] == ["ok"]


async def test_upstream_key_comes_from_the_configured_env_var(
    api: RunningStack, upstream: tuple[FastAPI, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MANIAC_TEST_MOCK_KEY", "sk-upstream")
    async with _sdk(api) as sdk:
        await sdk.chat.completions.create(
            model="mock:ok", messages=[{"role": "user", "content": "x"}]
        )
    headers = upstream[0].state.requests[-1]["headers"]
    assert headers["authorization"] == "Bearer sk-upstream"


@pytest.mark.parametrize("include_usage", [True, False])
async def test_streaming_relays_chunks_and_records_the_assembled_completion(
    api: RunningStack, include_usage: bool
) -> None:
    chunks = await _streamed(api, "mock/ok", stream_options={"include_usage": include_usage})
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ANSWER
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == (1 if include_usage else 0)
    ids = {c.id for c in chunks}
    assert len(ids) == 1
    [completion_id] = ids

    record = await _recorded(api, completion_id)
    assert record["choices"][0]["message"]["content"] == ANSWER
    assert record["choices"][0]["finish_reason"] == "stop"
    assert record["usage"]["completion_tokens"] == len(ANSWER.split())  # recorded either way
    assert record["operation"]["stream"] is True
    assert record["operation"]["status"] == "ok"


@pytest.mark.parametrize("stream", [False, True])
async def test_tool_calls(api: RunningStack, stream: bool) -> None:
    async with _sdk(api) as sdk:
        kwargs: dict[str, Any] = {
            "model": "mock/tools",
            "messages": [{"role": "user", "content": "weather?"}],
            "tools": TOOLS,
        }
        if stream:
            chunks = [c async for c in await sdk.chat.completions.create(stream=True, **kwargs)]
            completion_id = chunks[0].id
            finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        else:
            completion = await sdk.chat.completions.create(**kwargs)
            completion_id = completion.id
            finish = completion.choices[0].finish_reason
            call: Any = completion.choices[0].message.tool_calls[0]
            assert call.function.name == "get_weather"
    assert finish == "tool_calls"
    record = await _recorded(api, completion_id)
    [call] = record["choices"][0]["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}


async def test_fallback_moves_on_after_429_5xx_and_connection_errors(api: RunningStack) -> None:
    completion = await _completed(
        api,
        "mock/fail-429",
        extra_body={"models": ["mock/fail-503", "down/any", "mock/hang", "mock/ok"]},
    )
    assert completion.model == "mock/ok"
    record = await _recorded(api, completion.id)
    attempts = record["operation"]["attempts"]
    assert [(a["model"], a["status"], a["outcome"]) for a in attempts] == [
        ("mock/fail-429", 429, "retryable"),
        ("mock/fail-503", 503, "retryable"),
        ("down/any", None, "connect_error"),
        ("mock/hang", None, "timeout"),
        ("mock/ok", 200, "ok"),
    ]
    assert record["model"] == "mock/ok"
    assert await _settled_total(api) == 1  # one logical completion, listed once


async def test_a_200_that_holds_no_completion_moves_on_to_the_next_model(
    api: RunningStack,
) -> None:
    completion = await _completed(
        api,
        "mock/notjson",
        extra_body={"models": ["mock/error200", "mock/empty", "mock/nochoices", "mock/ok"]},
    )
    assert completion.model == "mock/ok"
    attempts = (await _recorded(api, completion.id))["operation"]["attempts"]
    assert [(a["model"], a["status"], a["outcome"], a["error"]) for a in attempts] == [
        ("mock/notjson", 200, "retryable", "upstream answered 200 with a body that is not JSON"),
        ("mock/error200", 200, "retryable", "upstream answered 200 with an error: overloaded"),
        ("mock/empty", 200, "retryable", "upstream answered 200 without choices"),
        ("mock/nochoices", 200, "retryable", "upstream answered 200 without choices"),
        ("mock/ok", 200, "ok", None),
    ]

    async with api.client(KEY_A) as client:
        response = await client.post(
            "/v1/chat/completions", json={"model": "mock/error200", "messages": []}
        )
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "service_unavailable"


@pytest.mark.parametrize("status", [400, 401, 402, 403, 409])
async def test_callers_fault_is_passed_through_without_fallback(
    api: RunningStack, upstream: tuple[FastAPI, str], status: int
) -> None:
    before = len(upstream[0].state.requests)
    async with api.client(KEY_A) as client:
        response = await client.post(
            "/v1/chat/completions",
            json={
                "model": f"mock/fail-{status}",
                "models": ["mock/ok"],
                "messages": [{"role": "user", "content": "x"}],
            },
        )
    assert response.status_code == status
    error = response.json()["error"]
    assert error["message"] == f"mock failure {status}"
    assert error["details"]["model"] == f"mock/fail-{status}"
    assert len(upstream[0].state.requests) == before + 1  # no fallback


@pytest.mark.parametrize(
    ("models", "status", "code"),
    [
        (["down/x", "mock/fail-429"], 429, "rate_limited"),
        (["mock/fail-500", "down/x"], 503, "service_unavailable"),
    ],
)
async def test_all_attempts_failing(
    api: RunningStack, models: list[str], status: int, code: str
) -> None:
    async with api.client(KEY_A) as client:
        response = await client.post(
            "/v1/chat/completions",
            json={"models": models, "messages": [{"role": "user", "content": "x"}]},
        )
    assert response.status_code == status
    body = response.json()
    assert body["error"]["code"] == code
    assert len(body["error"]["details"]["attempts"]) == len(models)


@pytest.mark.parametrize(
    "model", ["nothing", "nobody/model", "maniac:unknown-container", "maniac/"]
)
async def test_unknown_model_or_container_is_404(api: RunningStack, model: str) -> None:
    async with api.client(KEY_A) as client:
        response = await client.post("/v1/chat/completions", json={"model": model, "messages": []})
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


@pytest.mark.parametrize("slug", ["maniac:support", "maniac/support"])
async def test_container_slug_routes_to_its_model(api: RunningStack, slug: str) -> None:
    completion = await _completed(api, slug)
    assert completion.model == "mock/ok"
    record = await _recorded(api, completion.id)
    assert record["container"] == "support"
    async with api.client(KEY_A) as client:
        listed = (await client.get("/v1/chat/completions", params={"container": "support"})).json()
    assert [r["id"] for r in listed["data"]] == [completion.id]


async def test_store_false_records_nothing(api: RunningStack) -> None:
    async with _sdk(api) as sdk:
        skipped = await sdk.chat.completions.create(
            model="mock/ok", messages=[{"role": "user", "content": "x"}], store=False
        )
        kept = await sdk.chat.completions.create(
            model="mock/ok", messages=[{"role": "user", "content": "y"}]
        )
    await _recorded(api, kept.id)
    assert await _settled_total(api) == 1
    async with api.client(KEY_A) as client:
        assert (await client.get(f"/v1/chat/completions/{skipped.id}")).status_code == 404


async def test_client_disconnect_mid_stream_still_records_what_was_produced(
    api: RunningStack,
) -> None:
    async with api.client(KEY_A) as client:
        request = {
            "model": "mock/drip",
            "stream": True,
            "messages": [{"role": "user", "content": "slowly"}],
        }
        async with client.stream("POST", "/v1/chat/completions", json=request) as response:
            lines = response.aiter_lines()
            first = ""
            while not first.startswith("data:"):
                first = await anext(lines)
            second = ""
            while not second.startswith("data:"):
                second = await anext(lines)
        completion_id = json.loads(first[5:])["id"]
    record = await _recorded(api, completion_id)
    assert record["operation"]["status"] == "partial"
    content = record["choices"][0]["message"]["content"]
    assert content
    assert ANSWER.startswith(content)
    assert content != ANSWER


async def test_upstream_stream_cut_records_a_partial_completion(api: RunningStack) -> None:
    async with api.client(KEY_A) as client:
        request = {"model": "mock/cut", "stream": True, "messages": []}
        async with client.stream("POST", "/v1/chat/completions", json=request) as response:
            body = "".join([line async for line in response.aiter_lines()])
    assert "upstream_stream_error" in body
    assert body.rstrip().endswith("[DONE]") or "upstream_stream_error" in body
    first = json.loads(body.split("data: ")[1])
    record = await _recorded(api, first["id"])
    assert record["operation"]["status"] == "partial"
    assert ANSWER.startswith(record["choices"][0]["message"]["content"])


async def test_an_upstream_stream_closed_without_done_is_not_passed_on_as_complete(
    api: RunningStack,
) -> None:
    async with api.client(KEY_A) as client:
        request = {"model": "mock/nodone", "stream": True, "messages": []}
        async with client.stream("POST", "/v1/chat/completions", json=request) as response:
            events = [line async for line in response.aiter_lines() if line.startswith("data: ")]
    assert "data: [DONE]" not in events
    assert json.loads(events[-1][6:])["error"] == {
        "code": "upstream_stream_error",
        "message": "upstream closed the stream without [DONE]",
    }
    record = await _recorded(api, json.loads(events[0][6:])["id"])
    assert record["operation"]["status"] == "partial"
    assert record["choices"][0]["message"]["content"] == ANSWER  # all that came is kept


async def _events(api: RunningStack, request: dict[str, Any]) -> list[str]:
    async with (
        api.client(KEY_A) as client,
        client.stream("POST", "/v1/chat/completions", json=request) as response,
    ):
        assert response.status_code == 200
        return [line[6:] async for line in response.aiter_lines() if line.startswith("data: ")]


async def test_a_stream_that_holds_no_completion_moves_on_to_the_next_model(
    api: RunningStack,
) -> None:
    chunks = await _streamed(
        api, "mock/errfirst", extra_body={"models": ["mock/error200", "mock/notjson", "mock/ok"]}
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ANSWER
    record = await _recorded(api, chunks[0].id)
    assert [(a["model"], a["outcome"], a["error"]) for a in record["operation"]["attempts"]] == [
        ("mock/errfirst", "retryable", "upstream stream began with an error: no capacity"),
        ("mock/error200", "retryable", "upstream answered 200 with an error: overloaded"),
        ("mock/notjson", "retryable", "upstream stream ended before its first chunk"),
        ("mock/ok", "ok", None),
    ]
    assert record["operation"]["status"] == "ok"


async def test_a_json_answer_to_a_stream_request_is_relayed_as_a_stream(
    api: RunningStack,
) -> None:
    chunks = await _streamed(api, "mock/jsonstream", stream_options={"include_usage": True})
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ANSWER
    assert chunks[-1].usage is not None
    record = await _recorded(api, chunks[0].id)
    assert record["choices"][0]["message"]["content"] == ANSWER
    assert record["choices"][0]["finish_reason"] == "stop"
    assert record["usage"]["completion_tokens"] == len(ANSWER.split())
    assert record["operation"]["status"] == "ok"


@pytest.mark.parametrize("model", ["mock/errmid", "mock/errmid-openrouter"])
async def test_an_error_event_mid_stream_ends_it_as_cut_short(
    api: RunningStack, model: str
) -> None:
    events = await _events(api, {"model": model, "stream": True, "messages": []})
    assert "[DONE]" not in events
    assert json.loads(events[-1])["error"] == {
        "code": "upstream_stream_error",
        "message": "overloaded mid-stream",
        "details": {"upstream": {"message": "overloaded mid-stream", "code": 502}},
    }
    record = await _recorded(api, json.loads(events[0])["id"])
    assert record["operation"]["status"] == "partial"
    assert record["operation"]["attempts"][0]["error"] == (
        "upstream sent an error mid-stream: overloaded mid-stream"
    )
    assert record["choices"][0]["message"]["content"] == ANSWER.split()[0]


async def test_a_chunk_the_gateway_cannot_pass_on_ends_the_stream_as_cut_short(
    api: RunningStack,
) -> None:
    events = await _events(api, {"model": "mock/deepchunk", "stream": True, "messages": []})
    assert json.loads(events[-1])["error"]["code"] == "upstream_stream_error"
    record = await _recorded(api, json.loads(events[0])["id"])
    assert record["operation"]["status"] == "partial"
    assert record["operation"]["attempts"][0]["error"] == "stream not relayed: TypeError"
    assert record["choices"][0]["message"]["content"] == ANSWER.split()[0]


async def test_a_stream_records_reasoning_logprobs_and_the_gateways_creation_time(
    api: RunningStack,
) -> None:
    events = await _events(api, {"model": "mock/rich", "stream": True, "messages": []})
    assert events[-1] == "[DONE]"
    record = await _recorded(api, json.loads(events[0])["id"])
    assert {json.loads(e)["created"] for e in events[:-1]} == {record["created"]}
    [choice] = record["choices"]
    assert choice["message"]["content"] == "".join(ANSWER.split()[:2])
    assert choice["message"]["reasoning_content"] == "hm.hm."
    assert [p["token"] for p in choice["logprobs"]["content"]] == ANSWER.split()[:2]
    assert abs(record["created"] - time.time()) < 600  # not the upstream's `created: 1`


async def test_a_slow_body_is_a_timeout_and_moves_on(api: RunningStack) -> None:
    started = time.monotonic()
    completion = await _completed(api, "mock/trickle-6", extra_body={"models": ["mock/ok"]})
    assert time.monotonic() - started < 5  # the provider's timeout_s is 2, for the whole body
    assert completion.model == "mock/ok"
    attempts = (await _recorded(api, completion.id))["operation"]["attempts"]
    assert [(a["model"], a["outcome"]) for a in attempts] == [
        ("mock/trickle-6", "timeout"),
        ("mock/ok", "ok"),
    ]


async def test_the_upstreams_retry_after_is_passed_on(api: RunningStack) -> None:
    response = await _create(api, "mock/rl-30")
    assert response.status_code == 429
    assert response.headers["retry-after"] == "30"


@pytest.mark.parametrize(
    "model",
    [
        pytest.param("mock/badusage", id="counts-as-strings"),
        pytest.param("mock/baddetails", id="details-not-objects"),
    ],
)
async def test_usage_a_record_cannot_hold_is_dropped_not_the_completion(
    api: RunningStack, model: str
) -> None:
    response = await _create(api, model)
    assert response.status_code == 200
    answer = response.json()
    assert answer["usage"] is None
    ChatRes.model_validate(answer)
    record = await _recorded(api, answer["id"])
    assert record["usage"] is None
    assert record["choices"][0]["message"]["content"] == ANSWER
    ChatResRelaxed.model_validate(record)


async def test_content_a_record_cannot_hold_is_left_out_of_answer_and_record(
    api: RunningStack,
) -> None:
    """A recorded message's content is text, parts or null (the spec's RegisterOutputMessage):
    an upstream's content that is none of them was stored, and every list or get returning it
    broke the spec."""
    response = await _create(api, "mock/objectcontent")
    assert response.status_code == 200
    answer = response.json()
    assert answer["choices"][0]["message"] == {"role": "assistant"}
    ChatRes.model_validate(answer)
    record = await _recorded(api, answer["id"])
    assert record["choices"] == answer["choices"]
    ChatResRelaxed.model_validate(record)
    async with api.client(KEY_A) as client:
        listed = await client.get("/v1/chat/completions", params={"model": "mock/objectcontent"})
    assert [r.id for r in ChatListRes.model_validate(listed.json()).data] == [answer["id"]]


async def test_a_failed_request_through_a_container_is_recorded_in_it(
    api: RunningStack,
) -> None:
    assert (await _create(api, "maniac:broken")).status_code == 503
    assert await _settled_total(api) == 1
    async with api.client(KEY_A) as client:
        listed = (await client.get("/v1/chat/completions", params={"container": "broken"})).json()
    [record] = listed["data"]
    assert (record["container"], record["model"]) == ("broken", "mock/fail-500")
    assert record["operation"]["status"] == "error"


async def test_a_create_of_megabytes_is_recorded(api: RunningStack) -> None:
    # an image sent inline (a data URL) makes a request of megabytes: it is served, and its
    # record must not be dropped for its size
    image = "data:image/png;base64," + base64.b64encode(os.urandom(9 * 1024 * 1024)).decode()
    content: Any = [
        {"type": "text", "text": "what is in it?"},
        {"type": "image_url", "image_url": {"url": image}},
    ]
    before = _dropped()
    async with _sdk(api) as sdk:
        completion = await sdk.chat.completions.create(
            model="mock/ok", messages=[{"role": "user", "content": content}]
        )
    record = await _recorded(api, completion.id)
    assert record["choices"][0]["message"]["content"] == ANSWER
    assert _dropped() == before


def _dropped() -> float:
    return sum(
        REGISTRY.get_sample_value("maniac_telemetry_dropped_total", {"reason": r}) or 0.0
        for r in ("broker_error", "queue_full", "shutdown")
    )


async def test_broker_down_the_completion_still_returns_and_the_loss_is_counted(
    api_broker_gone: RunningStack,
) -> None:
    running = api_broker_gone
    before = _dropped()
    async with _sdk(running) as sdk:
        completion = await sdk.chat.completions.create(
            model="mock/ok", messages=[{"role": "user", "content": "still there?"}]
        )
    assert completion.choices[0].message.content == ANSWER
    assert running.stack.publisher is not None
    await running.stack.publisher.flush(timeout_s=15)
    assert _dropped() == before + 1


async def test_a_create_request_too_big_to_be_reasonable_is_refused_cheaply(
    start_stack: Any, upstream: tuple[FastAPI, str]
) -> None:
    running = await start_stack(max_messages_per_request=3, max_models_per_request=2)
    before = len(upstream[0].state.requests)
    message = {"role": "user", "content": "x"}
    async with running.client(KEY_A) as client:
        many = {"model": "mock/ok", "messages": [message] * 4}
        response = await client.post("/v1/chat/completions", json=many)
        assert response.status_code == 422
        assert response.json()["detail"] == [
            {"type": "too_long", "loc": ["body", "messages"], "msg": "At most 3 messages."}
        ]
        fallbacks = {"model": "mock/ok", "models": ["mock/a", "mock/b", "mock/c"], "messages": []}
        response = await client.post("/v1/chat/completions", json=fallbacks)
        assert response.json()["detail"][0]["msg"] == "At most 2 fallback models."
        # a body of many invalid parts gets a bounded answer
        bad = {"model": "mock/ok", "messages": [{"role": "robot"}] * 3, "n": "1", "tools": [5] * 99}
        detail = (await client.post("/v1/chat/completions", json=bad)).json()["detail"]
        assert len(detail) == 50
        deep: Any = "x"
        for _ in range(300):
            deep = [deep]
        nested = {"model": "mock/ok", "messages": [], "metadata": {"deep": deep}}
        response = await client.post("/v1/chat/completions", json=nested)
        assert response.status_code == 422
        assert response.json()["detail"][0]["msg"] == "JSON nested more than 200 levels deep."
    assert len(upstream[0].state.requests) == before  # none of them reached the upstream


async def test_a_create_request_nested_deeper_than_python_recurses_is_a_422(
    api: RunningStack,
) -> None:
    # A whole float (1.0 for an integer) has the body copied with whole floats as ints; the
    # copy recursed, and a body nested 600 levels deep (orjson parses 1,024) was a 500.
    deep = json.loads("[" * 600 + "]" * 600)
    tool = {"type": "function", "function": {"name": "f", "parameters": {"a": deep}}}
    body = json.dumps({"model": "mock/ok", "messages": [], "n": 1.0, "tools": [tool]})
    async with api.client(KEY_A) as client:
        response = await client.post(
            "/v1/chat/completions", content=body, headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 422, response.text[:500]
        assert response.json()["detail"][0]["msg"] == "JSON nested more than 200 levels deep."


async def test_create_validates_the_request(api: RunningStack) -> None:
    async with api.client(KEY_A) as client:
        response = await client.post("/v1/chat/completions", json={"model": "mock/ok"})
        assert response.status_code == 422
        assert response.json()["detail"][0]["loc"] == ["body", "messages"]
        response = await client.post("/v1/chat/completions", json={"messages": []})
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "bad_request"
        # the spec's types, as JSON Schema has them: "1" is no number, "true" no boolean...
        wrong: list[tuple[str, object]] = [("temperature", "1"), ("stream", "true"), ("n", 1.5)]
        for field, value in wrong:
            request: dict[str, object] = {"model": "mock/ok", "messages": [], field: value}
            response = await client.post("/v1/chat/completions", json=request)
            assert response.status_code == 422, field
            assert response.json()["detail"][0]["loc"] == ["body", field]
        # ...and 1.0 is an integer, passed on as it was sent
        request = {"model": "mock/ok", "messages": [], "n": 1.0, "temperature": 1}
        response = await client.post("/v1/chat/completions", json=request)
        assert response.status_code == 200, response.text
    async with api.client() as anonymous:
        no_key = await anonymous.post(
            "/v1/chat/completions", json={"model": "mock/ok", "messages": []}
        )
        assert no_key.status_code == 401
