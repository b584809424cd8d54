"""HTTP in, row out: register, then list/get through the public API."""

from __future__ import annotations

import asyncio
import copy
import gc
import gzip
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from schemas import OPENAPI_PATH, SCHEMAS_DIR
from schemas.api import ChatListRes, ChatResRelaxed, ErrorResponse, RegisterRes
from tests.conftest import eventually
from tests.e2e.conftest import KEY_A, KEY_B, RunningStack, StackFactory

FULL = json.loads((SCHEMAS_DIR / "examples" / "register_full.json").read_text())


def _item(n: int, **output: Any) -> dict[str, Any]:
    return {
        "input": {"model": "openai/gpt-4o", "messages": [{"role": "user", "content": f"q{n}"}]},
        "output": {
            "id": f"cmpl-{n}",
            "created": 1_700_000_000 + n,
            "model": "openai/gpt-4o",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": f"a{n}"}}],
            **output,
        },
    }


async def _visible(client: httpx.AsyncClient, total: int, **params: Any) -> dict[str, Any]:
    body: dict[str, Any] = {}

    async def check() -> bool:
        nonlocal body
        response = await client.get("/v1/chat/completions", params=params)
        assert response.status_code == 200, response.text
        body = response.json()
        # The page and the total are two queries: a row stored between them can be counted
        # before the page shows it, so wait for both.
        shown = min(total, int(params.get("limit", 20)))
        return bool(body["total"] == total and len(body["data"]) == shown)

    await eventually(check)
    return body


def _error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    envelope = ErrorResponse.model_validate(response.json())
    assert envelope.error.code == code
    assert envelope.error.message


async def test_register_then_list_and_get(api: RunningStack) -> None:
    async with api.client(KEY_A) as client:
        response = await client.post("/v1/chat/completions/register", json=FULL)
        assert response.status_code == 200, response.text
        result = RegisterRes.model_validate(response.json())
        assert result.ok is True
        assert result.container == "support-bot"
        assert result.summary == {"received": 1, "accepted": 1, "rejected": 0}
        assert result.errors == []

        listed = ChatListRes.model_validate(await _visible(client, 1))
        [record] = listed.data
        assert record.id == "chatcmpl-example-full"
        assert record.container == "support-bot"
        assert record.model == "openai/gpt-4o"
        assert record.provider == "openai"
        assert record.usage is not None
        assert record.usage.total_tokens == 22
        assert record.spend == pytest.approx(0.0000535)
        assert record.tags == ["math", "eval"]
        assert record.metadata == {"customer": "acme", "split": "train"}
        assert record.trace is not None
        assert record.trace.id == "trace-1"
        assert record.choices[0].message.content == "4"

        response = await client.get("/v1/chat/completions/chatcmpl-example-full")
        assert response.status_code == 200
        assert ChatResRelaxed.model_validate(response.json()) == record


async def test_invalid_items_are_reported_and_valid_ones_kept(api: RunningStack) -> None:
    items = [_item(1), {"input": {"messages": [{"role": "robot"}]}}, _item(2), {"output": {}}]
    async with api.client(KEY_A) as client:
        response = await client.post(
            "/v1/chat/completions/register", json={"container": "c", "items": items}
        )
        assert response.status_code == 200
        body = response.json()
        assert body["ok"] is False
        assert body["summary"] == {"received": 4, "accepted": 2, "rejected": 2}
        assert [e["index"] for e in body["errors"]] == [1, 3]
        assert body["errors"][0]["loc"] == ["items", 1, "input", "messages", 0, "role"]
        assert body["errors"][1]["loc"] == ["items", 3, "input"]
        listed = await _visible(client, 2)
        assert {r["id"] for r in listed["data"]} == {"cmpl-1", "cmpl-2"}


async def test_numbers_are_typed_as_json_schema_types_them(api: RunningStack) -> None:
    whole = _item(1, choices=[{"index": 0.0, "message": {"role": "assistant", "content": "a"}}])
    whole["input"]["n"] = 1.0  # 1.0 is an integer in JSON Schema
    text = _item(2)
    text["input"]["temperature"] = "0.5"  # a string is not a number
    async with api.client(KEY_A) as client:
        response = await client.post(
            "/v1/chat/completions/register", json={"container": "c", "items": [whole, text]}
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["summary"] == {"received": 2, "accepted": 1, "rejected": 1}
        assert body["errors"][0]["loc"] == ["items", 1, "input", "temperature"]
        listed = await _visible(client, 1)
        assert [r["id"] for r in listed["data"]] == ["cmpl-1"]
        assert listed["data"][0]["choices"][0]["index"] == 0  # stored as it was sent


async def test_an_item_nested_too_deeply_to_be_stored_is_reported(api: RunningStack) -> None:
    deep: Any = "x"
    for _ in range(300):
        deep = [deep]
    nested = _item(1)
    nested["metadata"] = {"deep": deep}
    async with api.client(KEY_A) as client:
        response = await client.post(
            "/v1/chat/completions/register", json={"container": "c", "items": [nested, _item(2)]}
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["summary"] == {"received": 2, "accepted": 1, "rejected": 1}
        assert body["errors"][0]["message"] == "JSON nested too deeply to be stored"
        assert [r["id"] for r in (await _visible(client, 1))["data"]] == ["cmpl-2"]


async def test_an_item_nested_deeper_than_python_recurses_is_reported(api: RunningStack) -> None:
    # A whole float (1.0 for an integer) has the item copied with whole floats as ints; the
    # copy recursed, and an item nested 600 levels deep (orjson parses 1,024) was a 500.
    nested = _item(1)
    nested["input"]["n"] = 1.0
    nested["metadata"] = {"deep": json.loads("[" * 600 + "]" * 600)}
    async with api.client(KEY_A) as client:
        response = await client.post(
            "/v1/chat/completions/register",
            content=json.dumps({"container": "c", "items": [nested, _item(2)]}),
            headers={"Content-Type": "application/json"},
        )
        assert response.status_code == 200, response.text[:500]
        body = response.json()
        assert body["summary"] == {"received": 2, "accepted": 1, "rejected": 1}
        assert body["errors"][0]["message"] == "JSON nested too deeply to be stored"


async def test_values_storage_cannot_hold_are_reported_and_later_items_still_stored(
    api: RunningStack,
) -> None:
    # Found by fuzzing: a spend beyond Decimal(38, 12) was accepted, and its insert then failed
    # on every retry, so nothing registered after it was ever stored.
    huge_tokens = {"prompt_tokens": 1e30, "completion_tokens": 1, "total_tokens": 1}
    items = [_item(1, spend=1e30), _item(2, usage=huge_tokens), _item(3, spend=0.5)]
    async with api.client(KEY_A) as client:
        response = await client.post(
            "/v1/chat/completions/register", json={"container": "c", "items": items}
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["summary"] == {"received": 3, "accepted": 1, "rejected": 2}
        assert [e["loc"] for e in body["errors"]] == [
            ["items", 0, "output", "spend"],
            ["items", 1, "output", "usage", "prompt_tokens"],
        ]
        listed = await _visible(client, 1)
        assert [(r["id"], r["spend"]) for r in listed["data"]] == [("cmpl-3", 0.5)]
        for later in (4, 5):
            payload = {"container": "c", "items": [_item(later)]}
            assert (await client.post("/v1/chat/completions/register", json=payload)).is_success
        await _visible(client, 3)


async def test_values_of_another_json_type_are_reported_not_stored(api: RunningStack) -> None:
    # Found by fuzzing: `"index": false` was accepted, stored as given, and every list or get
    # that returned it broke the spec's `integer | null`.
    bad_choice = {"index": False, "message": {"role": "assistant", "content": "a"}}
    items = [_item(1, choices=[bad_choice]), _item(2)]
    async with api.client(KEY_A) as client:
        response = await client.post(
            "/v1/chat/completions/register", json={"container": "c", "items": items}
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["summary"] == {"received": 2, "accepted": 1, "rejected": 1}
        assert body["errors"][0]["loc"] == ["items", 0, "output", "choices", 0, "index"]
        listed = await _visible(client, 1)
        assert [r["id"] for r in listed["data"]] == ["cmpl-2"]


async def test_an_id_with_a_slash_is_fetched_by_its_id(api: RunningStack) -> None:
    payload = {"container": "c", "items": [_item(1, id="org/run-1")]}
    async with api.client(KEY_A) as client:
        assert (await client.post("/v1/chat/completions/register", json=payload)).is_success
        await _visible(client, 1)
        for path in ("org%2Frun-1", "org/run-1"):
            response = await client.get(f"/v1/chat/completions/{path}")
            assert response.status_code == 200, response.text
            assert response.json()["id"] == "org/run-1"
        missing = await client.get("/v1/chat/completions/org%2Frun-2")
        assert missing.status_code == 404
        assert (
            missing.json()["error"]["message"] == "No chat completion 'org/run-2' in this project."
        )


async def test_an_id_with_a_newline_is_fetched_by_its_id(api: RunningStack) -> None:
    ids = ["run", "run\n", "run\nb"]
    items = [_item(n, id=i) for n, i in enumerate(ids)]
    async with api.client(KEY_A) as client:
        payload = {"container": "c", "items": items}
        assert (await client.post("/v1/chat/completions/register", json=payload)).is_success
        await _visible(client, len(ids))
        for n, completion_id in enumerate(ids):
            response = await client.get(f"/v1/chat/completions/{quote(completion_id, safe='')}")
            assert response.status_code == 200, (completion_id, response.text)
            assert response.json()["id"] == completion_id
            assert response.json()["choices"][0]["message"]["content"] == f"a{n}"
        missing = await client.get("/v1/chat/completions/run%0Ac")
        _error(missing, 404, "not_found")
        assert missing.json()["error"]["message"] == "No chat completion 'run\\nc' in this project."


async def test_the_same_id_twice_in_one_request_keeps_the_later_item(api: RunningStack) -> None:
    later = {"index": 0, "message": {"role": "assistant", "content": "corrected"}}
    items = [_item(1), _item(2), _item(1, choices=[later])]
    async with api.client(KEY_A) as client:
        response = await client.post(
            "/v1/chat/completions/register", json={"container": "c", "items": items}
        )
        assert response.json()["summary"] == {"received": 3, "accepted": 3, "rejected": 0}
        await _visible(client, 2)
        got = (await client.get("/v1/chat/completions/cmpl-1")).json()
        assert got["choices"][0]["message"]["content"] == "corrected"


async def test_a_retried_item_without_id_or_created_keeps_its_first_creation_time(
    api: RunningStack,
) -> None:
    payload = {"container": "c", "items": [{"input": {"messages": []}, "tags": ["retry"]}]}
    async with api.client(KEY_A) as client:
        assert (await client.post("/v1/chat/completions/register", json=payload)).is_success
        [first] = (await _visible(client, 1))["data"]
        await asyncio.sleep(0.05)  # the retry is received later
        assert (await client.post("/v1/chat/completions/register", json=payload)).is_success
        assert api.stack.worker is not None
        assert api.stack.publisher is not None
        assert await api.stack.worker.drain(dict(api.stack.publisher.acked), 20)
        again = (await client.get(f"/v1/chat/completions/{first['id']}")).json()
        assert again["created"] == first["created"]  # not the retry's receive time


async def test_same_completion_twice_is_listed_once(api: RunningStack) -> None:
    payload = {"container": "c", "items": [_item(1), _item(1), _item(2)]}
    input_only = {"container": "c", "items": [{"input": {"messages": []}, "tags": ["x"]}]}
    async with api.client(KEY_A) as client:
        for _ in range(2):
            assert (await client.post("/v1/chat/completions/register", json=payload)).is_success
            assert (await client.post("/v1/chat/completions/register", json=input_only)).is_success
        await _visible(client, 3)
        # all six requests were applied before this point: the total stays 3
        assert api.stack.worker is not None
        assert api.stack.publisher is not None
        assert await api.stack.worker.drain(dict(api.stack.publisher.acked), 20)
        body = (await client.get("/v1/chat/completions")).json()
        assert body["total"] == 3
        assert len(body["data"]) == 3


async def test_list_filters_order_and_pages(api: RunningStack) -> None:
    async with api.client(KEY_A) as client:
        for container, model in [("x", "openai/gpt-4o"), ("y", "mistral:small")]:
            items = [_item(n, model=model, id=f"{container}-{n}") for n in range(5)]
            response = await client.post(
                "/v1/chat/completions/register", json={"container": container, "items": items}
            )
            assert response.json()["ok"]
        await _visible(client, 10)

        desc = (await client.get("/v1/chat/completions", params={"limit": 3})).json()
        assert [r["id"] for r in desc["data"]] == ["y-4", "x-4", "y-3"]
        assert desc["total"] == 10
        asc = (await client.get("/v1/chat/completions", params={"order": "asc"})).json()
        assert [r["id"] for r in asc["data"]][:2] == ["x-0", "y-0"]
        page = (await client.get("/v1/chat/completions", params={"offset": 8})).json()
        assert [r["id"] for r in page["data"]] == ["y-0", "x-0"]
        by_container = (await client.get("/v1/chat/completions", params={"container": "y"})).json()
        assert by_container["total"] == 5
        assert {r["container"] for r in by_container["data"]} == {"y"}
        for slug in ("mistral/small", "mistral:small"):
            by_model = (await client.get("/v1/chat/completions", params={"model": slug})).json()
            assert by_model["total"] == 5
        both = await client.get(
            "/v1/chat/completions", params={"model": "mistral/small", "container": "x"}
        )
        assert both.json() == {"object": "list", "data": [], "total": 0}


async def test_an_empty_container_is_a_container_as_the_spec_allows(api: RunningStack) -> None:
    """RegisterReq's container is any string; "" is stored as is, and `container=` lists it."""
    async with api.client(KEY_A) as client:
        for container in ("", "c"):
            response = await client.post(
                "/v1/chat/completions/register",
                json={"container": container, "items": [_item(1, id=f"in-{container}")]},
            )
            assert response.status_code == 200, response.text
            assert (response.json()["container"], response.json()["ok"]) == (container, True)
        await _visible(client, 2)
        unlabelled = await _visible(client, 1, container="")
        assert [(r["id"], r["container"]) for r in unlabelled["data"]] == [("in-", "")]
        stored = await client.get("/v1/chat/completions/in-")
        assert stored.json()["container"] == ""


async def test_projects_are_isolated_on_every_endpoint(api: RunningStack) -> None:
    async with api.client(KEY_A) as a, api.client(KEY_B) as b:
        await a.post("/v1/chat/completions/register", json={"container": "c", "items": [_item(7)]})
        await _visible(a, 1)
        # projB sees none of it, whichever read path and filter it takes
        filters: list[dict[str, str | int]] = [
            {},
            {"container": "c"},
            {"model": "openai/gpt-4o"},
            {"model": "openai:gpt-4o", "container": "c"},
            {"order": "asc"},
            {"order": "asc", "offset": 0, "limit": 100},
        ]
        for params in filters:
            listed = await b.get("/v1/chat/completions", params=params)
            assert listed.json() == {"object": "list", "data": [], "total": 0}, params
        _error(await b.get("/v1/chat/completions/cmpl-7"), 404, "not_found")
        usage = await b.get("/v1/usage", params={"from": 1_699_920_000, "to": 1_700_092_800})
        assert usage.status_code == 200
        assert usage.json()["data"] == []
        # the same id registered by projB is projB's own completion, not projA's
        mine = _item(7, choices=[{"index": 0, "message": {"role": "assistant", "content": "b"}}])
        await b.post("/v1/chat/completions/register", json={"container": "c", "items": [mine]})
        await _visible(b, 1)
        got_b = (await b.get("/v1/chat/completions/cmpl-7")).json()
        got_a = (await a.get("/v1/chat/completions/cmpl-7")).json()
        assert got_b["choices"][0]["message"]["content"] == "b"
        assert got_a["choices"][0]["message"]["content"] == "a7"
        assert (await _visible(a, 1))["total"] == 1
        usage_a = await a.get("/v1/usage", params={"from": 1_699_920_000, "to": 1_700_092_800})
        assert sum(row["requests"] for row in usage_a.json()["data"]) == 1


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/chat/completions"),
        ("GET", "/v1/chat/completions/any"),
        ("POST", "/v1/chat/completions/register"),
    ],
)
@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="missing"),
        pytest.param({"Authorization": "Bearer wrong"}, id="wrong"),
        pytest.param({"Authorization": "Basic a2V5LWE6"}, id="not-bearer"),
        pytest.param({"Authorization": "Bearer"}, id="empty"),
    ],
)
async def test_missing_or_wrong_key_is_401(
    api: RunningStack, method: str, path: str, headers: dict[str, str]
) -> None:
    async with api.client(headers) as client:
        response = await client.request(method, path, json={"container": "c", "items": []})
        _error(response, 401, "unauthorized")
    wrong = headers.get("Authorization") == "Bearer wrong"
    assert response.headers["www-authenticate"] == (
        'Bearer error="invalid_token"' if wrong else "Bearer"
    )


@pytest.mark.parametrize(
    "params",
    [
        {"limit": 0},
        {"limit": 101},
        {"limit": "ten"},
        {"offset": -1},
        {"order": "sideways"},
    ],
)
async def test_out_of_range_list_parameters_are_422(
    api: RunningStack, params: dict[str, Any]
) -> None:
    async with api.client(KEY_A) as client:
        response = await client.get("/v1/chat/completions", params=params)
        assert response.status_code == 422
        assert response.json()["detail"][0]["loc"][0] == "query"


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"not json", id="not-json"),
        pytest.param(b"[]", id="array"),
        pytest.param(b'{"items": []}', id="no-container"),
        pytest.param(b'{"container": "c"}', id="no-items"),
        pytest.param(b'{"container": "c", "items": {}}', id="items-not-list"),
        pytest.param(b'{"container": "c", "items": [], "x": 1}', id="extra-field"),
        pytest.param(b"[" * 5000 + b"]" * 5000, id="too-deep"),
    ],
)
async def test_body_that_is_not_a_register_request_is_422(api: RunningStack, body: bytes) -> None:
    async with api.client(KEY_A) as client:
        response = await client.post(
            "/v1/chat/completions/register",
            content=body,
            headers={"Content-Type": "application/json"},
        )
        assert response.status_code == 422, response.text
        assert response.json()["detail"][0]["loc"][0] == "body"


@pytest.mark.parametrize(
    ("path", "field"),
    [("/v1/chat/completions/register", "container"), ("/v1/chat/completions", "model")],
)
async def test_a_refused_object_or_array_is_not_sent_back_in_the_422(
    api: RunningStack, path: str, field: str
) -> None:
    deep = b"[" * 900 + b"]" * 900  # within orjson's 1024 levels
    many = b",".join([b"[]"] * 200_000)
    bodies = {  # the refused value: the whole body (no container), or the model
        "/v1/chat/completions/register": b'{"items": [' + deep + b"," + many + b"]}",
        "/v1/chat/completions": b'{"messages": [], "model": [' + deep + b"," + many + b"]}",
    }
    async with api.client(KEY_A) as client:
        response = await client.post(
            path, content=bodies[path], headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 422, response.text[:500]
        assert len(response.content) < 1000
        [error] = response.json()["detail"]
        assert error["loc"] == ["body", field]
        assert "input" not in error
        short = {"container": "c" * 5, "items": 5}  # a scalar refused is still shown
        response = await client.post("/v1/chat/completions/register", json=short)
        assert response.json()["detail"][0]["input"] == 5


async def test_limits_on_body_size_and_item_count(start_stack: StackFactory) -> None:
    running = await start_stack(max_body_bytes=4096, max_items_per_request=3)
    async with running.client(KEY_A) as client:
        big = {"container": "c", "items": [_item(1, filler="x" * 5000)]}
        _error(
            await client.post("/v1/chat/completions/register", json=big), 413, "payload_too_large"
        )
        many = {"container": "c", "items": [{"input": {"messages": []}}] * 4}
        response = await client.post("/v1/chat/completions/register", json=many)
        assert response.status_code == 422
        assert response.json()["detail"][0]["loc"] == ["body", "items"]


async def test_a_gzipped_body_is_read_and_bounded_by_what_it_decompresses_to(
    start_stack: StackFactory,
) -> None:
    running = await start_stack(max_body_bytes=4096)
    gzipped = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    async with running.client(KEY_A) as client:
        body = json.dumps({"container": "c", "items": [_item(1), _item(2)]}).encode()
        response = await client.post(
            "/v1/chat/completions/register", content=gzip.compress(body), headers=gzipped
        )
        assert response.json()["summary"] == {"received": 2, "accepted": 2, "rejected": 0}
        assert {r["id"] for r in (await _visible(client, 2))["data"]} == {"cmpl-1", "cmpl-2"}

        bomb = json.dumps({"container": "c", "items": [_item(3, filler="x" * 100_000)]}).encode()
        assert len(gzip.compress(bomb)) < 4096  # small on the wire, 100 KB once read
        response = await client.post(
            "/v1/chat/completions/register", content=gzip.compress(bomb), headers=gzipped
        )
        _error(response, 413, "payload_too_large")
        response = await client.post(
            "/v1/chat/completions/register", content=gzip.compress(body)[:-8], headers=gzipped
        )
        _error(response, 400, "bad_request")
        response = await client.post(
            "/v1/chat/completions/register",
            content=body,
            headers={"Content-Type": "application/json", "Content-Encoding": "br"},
        )
        _error(response, 415, "unsupported_media_type")


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded"])
async def test_a_body_not_sent_as_json_is_422(api: RunningStack, content_type: str) -> None:
    body = json.dumps({"container": "c", "items": [_item(1)]}).encode()
    async with api.client(KEY_A) as client:
        for path in ("/v1/chat/completions/register", "/v1/chat/completions"):
            response = await client.post(path, content=body, headers={"Content-Type": content_type})
            assert response.status_code == 422, response.text
            assert response.json()["detail"][0]["type"] == "content_type"
        for accepted in ("application/json; charset=utf-8", "application/vnd.api+json"):
            response = await client.post(
                "/v1/chat/completions/register", content=body, headers={"Content-Type": accepted}
            )
            assert response.status_code == 200, response.text


async def test_bytes_held_across_requests_are_bounded(start_stack: StackFactory) -> None:
    running = await start_stack(max_body_bytes=4096, max_inflight_body_bytes=4096)
    body = json.dumps({"container": "c", "items": [_item(1, filler="x" * 3500)]}).encode()
    assert 3000 < len(body) <= 4096
    release = asyncio.Event()

    async def slow_upload() -> AsyncIterator[bytes]:  # chunked: no length declared
        yield body[:3000]
        await release.wait()
        yield body[3000:]

    async with running.client(KEY_A) as client:
        held = asyncio.create_task(
            client.post("/v1/chat/completions/register", content=slow_upload())
        )

        async def holding() -> bool:
            metrics = (await client.get("/metrics")).text
            return "maniac_gateway_inflight_body_bytes 3000.0" in metrics

        await eventually(holding)
        refused = await client.post("/v1/chat/completions/register", content=body)
        _error(refused, 503, "service_unavailable")
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["details"]["reason"] == "overloaded"

        release.set()
        assert (await held).json()["summary"]["accepted"] == 1
        accepted = await client.post("/v1/chat/completions/register", content=body)
        assert accepted.json()["summary"]["accepted"] == 1
        metrics = (await client.get("/metrics")).text
        assert "maniac_gateway_inflight_body_bytes 0.0" in metrics


async def _holding(
    client: httpx.AsyncClient, body: bytes, sent: int, release: asyncio.Event
) -> asyncio.Task[httpx.Response]:
    """A register whose first ``sent`` bytes arrive, and the rest once ``release`` is set: it
    holds those bytes meanwhile (the gateway's metric shows them)."""

    async def slow_upload() -> AsyncIterator[bytes]:  # chunked: no length declared
        yield body[:sent]
        await release.wait()
        yield body[sent:]

    held = asyncio.create_task(client.post("/v1/chat/completions/register", content=slow_upload()))

    async def holding() -> bool:
        metrics = (await client.get("/metrics")).text
        return f"maniac_gateway_inflight_body_bytes {float(sent)}" in metrics

    await eventually(holding)
    return held


def _register_body(n: int, size: int) -> bytes:
    body = json.dumps({"container": "c", "items": [_item(n, filler="")]}).encode()
    padded = json.dumps({"container": "c", "items": [_item(n, filler="x" * (size - len(body)))]})
    assert len(padded) == size
    return padded.encode()


async def test_a_project_over_its_share_leaves_the_rest_to_the_others(
    start_stack: StackFactory,
) -> None:
    running = await start_stack(
        max_body_bytes=4096, max_inflight_body_bytes=4096, project_budget_share=0.5
    )
    release = asyncio.Event()
    async with running.client(KEY_A) as a, running.client(KEY_B) as b:
        # project A alone holds 3000 of 4096 bytes, more than its half
        held = await _holding(a, _register_body(1, 3600), 3000, release)
        small = await b.post("/v1/chat/completions/register", content=_register_body(2, 300))
        assert small.status_code == 200, small.text

        # with B active, more of A's bytes are refused, on A's first bytes
        url = httpx.URL(running.base_url)
        reader, writer = await asyncio.open_connection(url.host, url.port)
        writer.write(
            b"POST /v1/chat/completions/register HTTP/1.1\r\nHost: x\r\n"
            b"Authorization: Bearer key-a\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n" + _register_body(3, 1000)[:900]
        )
        await writer.drain()
        answer = asyncio.create_task(reader.read(65536))
        try:

            async def taken_or_answered() -> bool:
                metrics = (await a.get("/metrics")).text
                return answer.done() or "maniac_gateway_inflight_body_bytes 3900.0" in metrics

            await eventually(taken_or_answered)
            # so what A does not hold is B's: its next register fits
            served = await b.post("/v1/chat/completions/register", content=_register_body(4, 600))
            assert served.status_code == 200, served.text
            refused = await asyncio.wait_for(answer, 10)
        finally:
            writer.close()
        assert refused.startswith(b"HTTP/1.1 503 "), refused
        assert b"retry-after: 1\r\n" in refused.lower()
        error = json.loads(refused.partition(b"\r\n\r\n")[2])["error"]
        assert error["code"] == "service_unavailable"
        assert error["details"] == {
            "reason": "project_share",
            "max_inflight_bytes": 4096,
            "project_share_bytes": 2048,
        }
        assert "'projA' holds its share" in error["message"]

        release.set()  # A's first register, past its share, is refused its next bytes too
        rest_refused = await held
        _error(rest_refused, 503, "service_unavailable")
        assert rest_refused.json()["error"]["details"]["reason"] == "project_share"
        assert (await _visible(b, 2))["total"] == 2
        metrics = (await a.get("/metrics")).text
        assert "maniac_gateway_inflight_body_bytes 0.0" in metrics


async def test_a_project_alone_may_hold_the_whole_in_flight_budget(
    start_stack: StackFactory,
) -> None:
    running = await start_stack(
        max_body_bytes=4096, max_inflight_body_bytes=4096, project_budget_share=0.5
    )
    release = asyncio.Event()
    async with running.client(KEY_A) as a:
        held = await _holding(a, _register_body(1, 3600), 3000, release)
        more = await a.post("/v1/chat/completions/register", content=_register_body(2, 900))
        assert more.status_code == 200, more.text  # 3900 of 4096 bytes, past its share
        release.set()
        assert (await held).json()["summary"]["accepted"] == 1
        assert (await _visible(a, 2))["total"] == 2


async def test_records_that_outgrow_their_body_count_against_the_bytes_held(
    start_stack: StackFactory,
) -> None:
    # each item's record repeats the container: 100 items in a 20 KB container make 2 MB of
    # records from 22 KB of body (2,000 in 100 KB made 1.2 GB of memory from 170 KB)
    running = await start_stack(max_inflight_body_bytes=1_000_000)
    wide = {"container": "c" * 20_000, "items": [_item(n) for n in range(100)]}
    async with running.client(KEY_A) as client:
        response = await client.post("/v1/chat/completions/register", json=wide)
        _error(response, 413, "payload_too_large")
        metrics = (await client.get("/metrics")).text
        assert "maniac_gateway_inflight_body_bytes 0.0" in metrics
        fewer = {**wide, "items": wide["items"][:10]}  # 200 KB of records: they fit
        response = await client.post("/v1/chat/completions/register", json=fewer)
        assert response.json()["summary"]["accepted"] == 10
        assert (await _visible(client, 10))["total"] == 10


async def test_a_body_that_does_not_arrive_holds_only_what_came_and_times_out(
    start_stack: StackFactory,
) -> None:
    running = await start_stack(
        max_body_bytes=4096, max_inflight_body_bytes=4096, body_read_timeout_s=1.0
    )
    url = httpx.URL(running.base_url)
    reader, writer = await asyncio.open_connection(url.host, url.port)
    writer.write(  # declares 4000 bytes, sends one
        b"POST /v1/chat/completions/register HTTP/1.1\r\nHost: x\r\n"
        b"Authorization: Bearer key-a\r\nContent-Type: application/json\r\n"
        b"Content-Length: 4000\r\n\r\n{"
    )
    await writer.drain()
    try:
        body = json.dumps({"container": "c", "items": [_item(1)]}).encode()
        async with running.client(KEY_A) as client:
            # the 4000 bytes declared are not held before they come: others still get in
            accepted = await client.post("/v1/chat/completions/register", content=body)
            assert accepted.status_code == 200, accepted.text
        answer = b""
        while b"}}" not in answer:
            answer += await asyncio.wait_for(reader.read(4096), 10)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b"The request body was not received within 1 s." in answer


async def test_a_request_waiting_for_the_broker_no_longer_holds_its_parsed_items(
    api: RunningStack,
) -> None:
    """While its records go to the broker, a register request holds them encoded, not its
    parsed items (some 60 objects each, which the garbage collector would scan again and
    again while requests wait their turn)."""
    publisher = api.stack.publisher
    assert publisher is not None
    marker = f"probe-{uuid.uuid4()}"
    alive_at_publish: list[int] = []
    publish = publisher.publish

    async def observed(messages: list[tuple[bytes, bytes]]) -> None:
        alive_at_publish.append(
            sum(1 for o in gc.get_objects() if type(o) is dict and o.get("tags") == [marker])
        )
        await publish(messages)

    # only the request's bytes name the marker in this process: no dict of the test's own
    body = json.dumps(
        {"container": "held", "items": [{**_item(n), "tags": [marker]} for n in range(900, 950)]}
    ).encode()
    publisher.publish = observed  # type: ignore[method-assign]
    try:
        async with api.client(KEY_A) as client:
            response = await client.post("/v1/chat/completions/register", content=body)
    finally:
        del publisher.publish
    assert response.json()["summary"] == {"received": 50, "accepted": 50, "rejected": 0}
    assert alive_at_publish == [0]


async def test_health_readiness_and_spec(api: RunningStack) -> None:
    async with api.client() as client:
        assert (await client.get("/healthz")).json() == {"status": "ok"}
        ready = await client.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["checks"] == {"broker": True, "clickhouse": True}
        assert (await client.get("/openapi.json")).json() == json.loads(OPENAPI_PATH.read_text())
        _error(await client.get("/no/such/route"), 404, "not_found")


def test_examples_are_not_mutated() -> None:
    assert copy.deepcopy(FULL) == FULL


async def test_rate_limit_per_key_with_headers(start_stack: StackFactory) -> None:
    running = await start_stack(rate_limit_per_minute=3)
    async with running.client(KEY_A) as a, running.client(KEY_B) as b:
        remaining = []
        for _ in range(3):
            response = await a.get("/v1/chat/completions")
            assert response.status_code == 200
            assert response.headers["X-RateLimit-Limit"] == "3"
            remaining.append(int(response.headers["X-RateLimit-Remaining"]))
        assert remaining == [2, 1, 0]
        refused = await a.post(
            "/v1/chat/completions/register", json={"container": "c", "items": []}
        )
        _error(refused, 429, "rate_limited")
        assert int(refused.headers["Retry-After"]) >= 1
        assert int(refused.headers["X-RateLimit-Reset"]) > 1_700_000_000
        assert refused.headers["X-RateLimit-Remaining"] == "0"
        assert (await b.get("/v1/chat/completions")).status_code == 200  # other key, own limit


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def test_metrics_count_requests_rows_and_lag(api: RunningStack) -> None:
    async with api.client(KEY_A) as client:
        before = (await client.get("/metrics")).text
        await client.post(
            "/v1/chat/completions/register",
            json={"container": "m", "items": [_item(1), {"input": 5}]},
        )
        await _visible(client, 1)
        after = ""

        async def rows_counted() -> bool:
            # a row is visible as soon as ClickHouse has it, a moment before the worker counts it
            nonlocal after
            after = (await client.get("/metrics")).text
            return _metric(after, "maniac_worker_rows_inserted_total") >= (
                _metric(before, "maniac_worker_rows_inserted_total") + 1
            )

        await eventually(rows_counted)
    route = "/v1/chat/completions/register"
    assert _metric(after, "maniac_http_requests_total", route=route, status="200") == (
        _metric(before, "maniac_http_requests_total", route=route, status="200") + 1
    )
    for outcome in ("accepted", "rejected"):
        assert _metric(after, "maniac_register_items_total", outcome=outcome) == (
            _metric(before, "maniac_register_items_total", outcome=outcome) + 1
        )
    assert "maniac_worker_consumer_lag{" in after
    assert "maniac_worker_insert_seconds_bucket" in after
    assert "maniac_telemetry_dropped_total" in after
