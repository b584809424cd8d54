from __future__ import annotations

import struct

import pytest

from services.common.broker_storage import (
    batch_end,
    batch_name,
    batch_offset,
    follow_chain,
    offsets_held,
    read_high_watermark,
)


def _batch(records: int, body: int = 40) -> bytes:
    """A record batch's bytes as Tansu stores them: base offset 0, batchLength, ...,
    lastOffsetDelta at byte 23."""
    size = 61 + body
    head = struct.pack(">qiibi", 0, size - 12, 0, 2, 0) + struct.pack(">hi", 0, records - 1)
    return head + bytes(size - len(head))


@pytest.mark.parametrize(
    ("stored", "size", "end"),
    [
        pytest.param(_batch(5), None, 15, id="whole"),
        pytest.param(_batch(1), None, 11, id="one-record"),
        pytest.param(_batch(5)[:70], 70, None, id="cut-short"),
        pytest.param(b"", 0, None, id="empty"),
        pytest.param(_batch(5)[:20], 20, None, id="shorter-than-a-header"),
    ],
)
def test_batch_end(stored: bytes, size: int | None, end: int | None) -> None:
    assert batch_end(10, len(stored) if size is None else size, stored[:27]) == end


def test_batch_names_are_their_base_offsets() -> None:
    assert batch_name(139) == "00000000000000000139.batch"
    assert batch_offset("a/records/" + batch_name(139)) == 139
    assert batch_offset("a/records/00000000000000000139.batch.tmp") is None
    assert batch_offset("a/watermark.json") is None


@pytest.mark.parametrize(
    ("ends", "start", "chain"),
    [
        pytest.param({}, 0, [], id="nothing-past-the-watermark"),
        pytest.param({25: 63, 63: 98, 98: 120}, 25, [25, 63, 98], id="contiguous"),
        pytest.param({25: 63, 70: 80}, 25, [25], id="gap"),
        pytest.param({25: 63, 63: None, 98: 120}, 25, [25], id="broken-object"),
        pytest.param({25: 63, 32: 40, 63: 70}, 25, [25, 63], id="stale-interleaved"),
        pytest.param({32: 40}, 25, [], id="watermark-mid-batch"),
    ],
)
def test_follow_chain(ends: dict[int, int | None], start: int, chain: list[int]) -> None:
    assert follow_chain(start, ends.get) == chain


@pytest.mark.parametrize(
    ("body", "high"),
    [
        pytest.param(b'{"low":null,"high":1613,"timestamps":null}', 1613, id="stored"),
        pytest.param(b'{"low":null,"high":null,"timestamps":null}', 0, id="nothing-yet"),
        pytest.param(b'{"low":null,"hi', None, id="cut-short"),
        pytest.param(b"", None, id="empty"),
        pytest.param(None, None, id="missing"),
    ],
)
def test_read_high_watermark(body: bytes | None, high: int | None) -> None:
    assert read_high_watermark(body) == high


@pytest.mark.parametrize(
    ("offset", "held"),
    [
        pytest.param(10, 10, id="up-to-the-next-batch"),
        pytest.param(30, 5, id="the-last-up-to-the-watermark"),
    ],
)
def test_offsets_held_by_a_broken_batch(offset: int, held: int) -> None:
    assert offsets_held(offset, [0, 10, 20, 30], watermark=35) == held
