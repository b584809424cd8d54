"""A local OpenAI-compatible upstream: canned completions, and errors on request.

The model name says what to do: ``ok`` (default) answers, ``tools`` calls the first tool,
``fail-<status>`` answers that status with an OpenAI-style error body, ``slow-<ms>`` waits
before answering, ``hang`` never answers, ``cut`` streams half an answer and drops the
connection. Streams send one word per chunk (50 ms apart when the model is ``drip``), honour
``stream_options.include_usage``, and end with ``data: [DONE]`` (``nodone`` leaves it out).
Upstreams that misbehave: ``empty`` and ``nochoices`` answer 200 with ``{}`` and an object without
choices, ``rl-<s>`` a 429 with ``Retry-After: <s>``, ``trickle-<s>`` sends a space a second for
``<s>`` seconds before its answer, ``jsonstream`` answers a stream request with one JSON body,
``errfirst`` and ``errmid`` send an error event first and after one chunk
(``errmid-openrouter`` as OpenRouter does), ``rich`` streams
``reasoning_content`` and logprobs, ``badusage`` reports token counts as strings,
``baddetails`` its token details as lists, ``objectcontent`` answers with content that is an
object (neither text nor a list of parts), ``deepchunk`` streams a chunk nested 300 levels deep.
Every request body is kept in ``requests`` for the tests to inspect.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

ANSWER = "The quick brown fox jumps over the lazy dog."


def _usage(prompt: int, completion: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


def _json(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def _tool_call(body: dict[str, Any]) -> dict[str, Any]:
    name = body["tools"][0]["function"]["name"]
    return {
        "id": "call_mock_1",
        "type": "function",
        "function": {"name": name, "arguments": '{"city": "Paris"}'},
    }


def create_upstream() -> FastAPI:
    app = FastAPI()
    app.state.requests = []

    @app.post("/v1/chat/completions")
    async def complete(request: Request) -> Response:
        body: dict[str, Any] = orjson.loads(await request.body())
        app.state.requests.append({"body": body, "headers": dict(request.headers)})
        model = str(body.get("model", "ok"))
        if model.startswith("fail-"):
            status = int(model.removeprefix("fail-"))
            error = {"message": f"mock failure {status}", "type": "mock_error", "code": status}
            return _json({"error": error}, status)
        if model == "notjson":
            return Response(b"<html>502 Bad Gateway</html>", media_type="text/html")
        if model == "error200":  # some gateways answer a failure with 200
            return _json({"error": {"message": "overloaded", "type": "server_error"}})
        if model in ("empty", "nochoices"):
            return _json({} if model == "empty" else {"id": "x", "object": "chat.completion"})
        if model.startswith("rl-"):
            error = {"message": "slow down", "type": "rate_limit"}
            headers = {"Retry-After": model.removeprefix("rl-")}
            return Response(orjson.dumps({"error": error}), 429, headers, "application/json")
        if model.startswith("trickle-"):
            return StreamingResponse(_trickle(int(model.removeprefix("trickle-"))))
        if model == "hang":
            await asyncio.sleep(60)
        if model.startswith("slow-"):
            await asyncio.sleep(int(model.removeprefix("slow-")) / 1000)
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in body["messages"])
        wants_tool = model == "tools" and body.get("tools")
        if body.get("stream") and model != "jsonstream":
            return StreamingResponse(
                _stream(body, model, prompt_tokens, bool(wants_tool)),
                media_type="text/event-stream",
            )
        message: dict[str, Any] = {"role": "assistant", "content": ANSWER}
        if model == "objectcontent":
            message["content"] = {"type": "text", "text": ANSWER}
        finish = "stop"
        if wants_tool:
            message = {"role": "assistant", "content": None, "tool_calls": [_tool_call(body)]}
            finish = "tool_calls"
        usage: dict[str, Any] = _usage(prompt_tokens, len(ANSWER.split()))
        if model == "badusage":
            usage = {k: str(v) if isinstance(v, int) else v for k, v in usage.items()}
        if model == "baddetails":
            usage = {**usage, "prompt_tokens_details": [], "completion_tokens_details": []}
        return _json(
            {
                "id": "chatcmpl-upstream",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "system_fingerprint": "fp_mock",
                "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                "usage": usage,
            }
        )

    return app


async def _stream(
    body: dict[str, Any], model: str, prompt_tokens: int, tool: bool
) -> AsyncIterator[bytes]:
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    base = {
        "id": "chatcmpl-upstream",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": model,
    }

    def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        chunk = {**base, "choices": choices, **extra}
        if include_usage:
            chunk.setdefault("usage", None)
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    if model == "errfirst":
        yield b'data: {"error": {"message": "no capacity", "code": 503}}\n\n'
        return
    yield event([{"index": 0, "delta": {"role": "assistant", "content": ""}}])
    words = ANSWER.split(" ")
    if model == "deepchunk":  # deeper than any JSON encoder writes
        deep: Any = "x"
        for _ in range(300):
            deep = [deep]
        yield event([{"index": 0, "delta": {"content": words[0]}}])
        yield b"data: " + json.dumps({**base, "choices": [], "deep": deep}).encode() + b"\n\n"
        yield b"data: [DONE]\n\n"
        return
    if model in ("errmid", "errmid-openrouter"):
        yield event([{"index": 0, "delta": {"content": words[0]}}])
        error = {"message": "overloaded mid-stream", "code": 502}
        if model == "errmid":
            yield b"data: " + orjson.dumps({"error": error}) + b"\n\n"
        else:  # OpenRouter's: the error in a chunk whose choice finished with "error"
            choice = {"index": 0, "delta": {"content": ""}, "finish_reason": "error"}
            yield event([choice], error=error)
        yield b"data: [DONE]\n\n"
        return
    if model == "rich":
        for word in words[:2]:
            logprobs = {"content": [{"token": word, "logprob": -0.5}], "refusal": None}
            yield event([{"index": 0, "delta": {"reasoning_content": "hm."}}])
            yield event([{"index": 0, "delta": {"content": word}, "logprobs": logprobs}])
    if tool:
        call = _tool_call(body)
        first = {
            "index": 0,
            "id": call["id"],
            "type": "function",
            "function": {"name": call["function"]["name"], "arguments": ""},
        }
        yield event([{"index": 0, "delta": {"tool_calls": [first]}}])
        for part in ('{"city": ', '"Paris"}'):
            delta = {"tool_calls": [{"index": 0, "function": {"arguments": part}}]}
            yield event([{"index": 0, "delta": delta}])
        yield event([{"index": 0, "delta": {}, "finish_reason": "tool_calls"}])
    elif model != "rich":
        for i, word in enumerate(words):
            if model == "cut" and i == len(words) // 2:
                raise ConnectionResetError("mock upstream dropped the stream")
            if model == "drip":
                await asyncio.sleep(0.05)
            text = word if i == 0 else f" {word}"
            yield event([{"index": 0, "delta": {"content": text}}])
        yield event([{"index": 0, "delta": {}, "finish_reason": "stop"}])
    if include_usage:
        yield event([], usage=_usage(prompt_tokens, len(words)))
    if model != "nodone":  # an upstream that closes the stream without saying it is done
        yield b"data: [DONE]\n\n"


async def _trickle(seconds: int) -> AsyncIterator[bytes]:
    for _ in range(seconds):
        yield b" "
        await asyncio.sleep(1)
    yield orjson.dumps({"choices": [{"index": 0, "message": {"role": "assistant"}}]})
