"""Reading request bodies: gzip in members, bounded by what it decompresses to."""

from __future__ import annotations

import gzip
import tracemalloc
import zlib
from collections.abc import Iterable

import orjson
import pytest
from starlette.requests import Request

from schemas.api import ChatReq
from services.common.errors import BadRequest, PayloadTooLarge
from services.common.settings import GatewaySettings
from services.gateway.endpoints import Gunzip, read_json_body, read_model


def _request(chunks: Iterable[bytes], headers: dict[str, str]) -> Request:
    parts = list(chunks)

    async def receive() -> dict[str, object]:
        body = parts.pop(0) if parts else b""
        return {"type": "http.request", "body": body, "more_body": bool(parts)}

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
    }
    return Request(scope, receive)


GZIP = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
JSON = {"Content-Type": "application/json"}


def test_gzip_members_one_after_another_are_one_body() -> None:
    gunzip = Gunzip()
    data = gzip.compress(b'{"a": ') + gzip.compress(b"1}")
    assert b"".join(gunzip.feed(data[i : i + 7], 1000) for i in range(0, len(data), 7)) == (
        b'{"a": 1}'
    )
    assert gunzip.complete


def test_bytes_after_the_gzip_data_are_refused() -> None:
    with pytest.raises(zlib.error):
        Gunzip().feed(gzip.compress(b"{}") + b"garbage", 1000)


def test_gunzip_gives_at_most_one_byte_over_the_room_asked_for() -> None:
    bomb = gzip.compress(bytes(10_000_000))
    assert len(Gunzip().feed(bomb, 1000)) == 1001


async def test_a_gzip_bomb_is_refused_without_being_decompressed_whole() -> None:
    bomb = gzip.compress(bytes(100_000_000))  # 100 MB of zeros in about 100 KB
    chunks = [bomb[i : i + 65536] for i in range(0, len(bomb), 65536)]
    tracemalloc.start()
    try:
        with pytest.raises(PayloadTooLarge):
            await read_json_body(_request(chunks, GZIP), 10_000, None, 10.0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2_000_000


async def test_a_body_of_gzip_members_is_read_and_one_cut_short_refused() -> None:
    body = gzip.compress(b'{"items": ') + gzip.compress(b"[1, 2]}")
    assert await read_json_body(_request([body], GZIP), 10_000, None, 10.0) == {"items": [1, 2]}
    with pytest.raises(BadRequest, match="ends before"):
        await read_json_body(_request([body[:-8]], GZIP), 10_000, None, 10.0)


async def test_only_the_fields_holding_a_whole_float_are_copied() -> None:
    # 1.0 for an integer has the body validated again as a copy with whole floats as ints;
    # copying all of it took seconds for a large body, and twice its memory
    tool = {"type": "function", "function": {"name": "f", "parameters": {"a": [[]] * 1_000_000}}}
    raw = orjson.dumps({"model": "m", "messages": [], "n": 1.0, "tools": [tool]})
    tracemalloc.start()
    try:
        orjson.loads(raw)
        parsed = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        body, chat = await read_model(_request([raw], JSON), ChatReq, GatewaySettings())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert chat.n == 1
    assert body["n"] == 1.0  # sent on as it came
    assert peak < parsed * 1.5
