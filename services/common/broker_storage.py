"""Repair of the embedded broker's S3 storage, before the broker starts on it.

Tansu 0.6.0 keeps a partition as one object per record batch, named by the batch's base
offset (``.../partitions/0000000000/records/00000000000000000042.batch``, the Kafka record
batch as produced), and a ``watermark.json`` holding the high watermark. A broker killed
between writing a batch and its watermark, or an S3 server that cuts an object short when
killed as it is rewritten (s3rver does), leaves:

* a high watermark behind the batches stored: the broker numbers new batches from it and
  overwrites only objects of the same name; the batches of the earlier life past it stay,
  and a fetch lands on them (records read twice, and a consumer's position jumping past new
  records: acknowledged records never stored);
* an empty or cut short batch object: every fetch that reaches it fails in Tansu, and the
  consumer is stuck on it for good.

:func:`repair_storage` follows, in each partition, the chain of complete batches that starts
at the watermark (each one's end is the next one's name), moves the watermark to the end of
that chain (those batches were stored; the ones acknowledged stay readable), and deletes
every object from that end on, and those past the watermark off the chain: batches of an
earlier life of the log, or a write cut short. Objects past a break in the chain cannot be
told apart from an earlier life's, and keeping them would have new batches numbered among
them: they are deleted and their records counted in the log. An object below the watermark
too short to hold a batch is deleted too: its records are gone already, and Tansu reads on
past a missing object, but not past a broken one.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import structlog

from services.common.s3 import S3, S3Object

log = structlog.get_logger(__name__)

BATCH_HEADER = 61
"""Bytes of a Kafka record batch (v2) before its records."""
_HEAD = 27
"""What is read of each batch: baseOffset (8), batchLength (4), partitionLeaderEpoch (4),
magic (1), crc (4), attributes (2), lastOffsetDelta (4)."""


def batch_name(offset: int) -> str:
    return f"{offset:020d}.batch"


def batch_offset(name: str) -> int | None:
    """The base offset a batch object is named by; None for another object."""
    stem, _, suffix = name.rpartition("/")[2].partition(".")
    return int(stem) if suffix == "batch" and stem.isdigit() else None


def batch_end(offset: int, size: int, head: bytes) -> int | None:
    """The offset after the last record of the batch stored at ``offset`` whose object has
    ``size`` bytes and begins with ``head``; None when the object is not one whole batch."""
    if size < BATCH_HEADER or len(head) < _HEAD:
        return None
    (length,) = struct.unpack_from(">i", head, 8)
    (last_delta,) = struct.unpack_from(">i", head, 23)
    if length + 12 != size or last_delta < 0:
        return None
    return offset + int(last_delta) + 1


def follow_chain(start: int, end_of: Callable[[int], int | None]) -> list[int]:
    """The base offsets of the batches that follow on one another from ``start``: each
    batch's end is the next one's base offset. ``end_of``: a batch's end, None when there is
    no whole batch at that offset."""
    chain: list[int] = []
    offset = start
    while (end := end_of(offset)) is not None and end > offset:
        chain.append(offset)
        offset = end
    return chain


def offsets_held(offset: int, names: Sequence[int], watermark: int) -> int:
    """How many offsets the batch at ``offset`` held, below the watermark: up to the next
    object's name (``names``: every batch object's, in order), or the watermark."""
    following = names[bisect.bisect_right(names, offset) :]
    return min([*following, watermark]) - offset


def read_high_watermark(body: bytes | None) -> int | None:
    """The high watermark in a ``watermark.json`` (0 for ``null``: nothing stored yet);
    None when missing or unreadable."""
    try:
        high: object = json.loads(body or b"").get("high")
    except (ValueError, AttributeError):
        return None
    if high is None:
        return 0
    return high if isinstance(high, int) and high >= 0 else None


@dataclass
class PartitionRepair:
    prefix: str
    watermark_was: int | None
    watermark: int
    chain: list[int] = field(default_factory=list)
    """Batches found past the watermark that follow on from it: kept."""
    stale: dict[int, int] = field(default_factory=dict)
    """Objects deleted from past the watermark (base offset: records, 0 when unreadable)."""
    broken: list[int] = field(default_factory=list)
    """Objects deleted from below the watermark, too short to hold a batch."""
    broken_records: int = 0
    """The offsets those held, up to the next object's (their records are gone)."""
    rewrote_watermark: bool = False

    @property
    def changed(self) -> bool:
        return bool(self.chain or self.stale or self.broken or self.rewrote_watermark)


def repair_partition(s3: S3, prefix: str) -> PartitionRepair:
    """Repair one partition (``prefix``: ``.../partitions/0000000000/``), as the module says."""
    records = f"{prefix}records/"
    raw = s3.get(f"{prefix}watermark.json")
    watermark_was = read_high_watermark(raw)
    watermark = watermark_was or 0
    objects: dict[int, S3Object] = {}
    broken: list[int] = []
    names: list[int] = []
    for item in s3.list(records):
        if (offset := batch_offset(item.key)) is None:
            continue
        names.append(offset)
        if offset >= watermark:
            objects[offset] = item
        elif item.size < BATCH_HEADER:
            broken.append(offset)

    ends: dict[int, int | None] = {}

    def end_of(offset: int) -> int | None:
        item = objects.get(offset)
        if item is None or item.size < BATCH_HEADER:
            return None
        if offset not in ends:
            ends[offset] = batch_end(offset, item.size, s3.get(item.key, 0, _HEAD - 1) or b"")
        return ends[offset]

    chain = follow_chain(watermark, end_of)
    end = (end_of(chain[-1]) or watermark) if chain else watermark
    on_chain = set(chain)
    stale: dict[int, int] = {}
    for offset, item in objects.items():
        if offset in on_chain:
            continue
        head = s3.get(item.key, 0, _HEAD - 1) if item.size >= _HEAD else b""
        records_in = struct.unpack_from(">i", head, 23)[0] + 1 if head and len(head) >= _HEAD else 0
        s3.delete(item.key)
        stale[offset] = max(0, records_in)
    for offset in broken:
        s3.delete(f"{records}{batch_name(offset)}")
    broken_records = sum(offsets_held(offset, names, watermark) for offset in broken)
    # last: a repair cut short is done again from the same watermark at the next start
    rewrite = end != watermark_was and (end > 0 or raw is not None)
    if rewrite:
        state = {"low": None, "high": end, "timestamps": None}
        with contextlib.suppress(ValueError, TypeError):
            state = {**json.loads(raw or b""), "high": end}
        s3.put(f"{prefix}watermark.json", json.dumps(state, separators=(",", ":")).encode())
    return PartitionRepair(
        prefix, watermark_was, end, chain, stale, broken, broken_records, rewrite
    )


CLUSTER = "tansu_cluster"
"""The cluster id Tansu keeps its objects under when started without one, as here."""


def _partitions(s3: S3) -> list[str]:
    """Every partition's prefix, from the topics in the cluster's ``meta.json`` (s3rver's
    listings by delimiter leave most common prefixes out)."""
    meta = s3.get(f"clusters/{CLUSTER}/meta.json")
    if not meta:
        return []
    topics = json.loads(meta).get("topics", {})
    return [
        f"clusters/{CLUSTER}/topics/{topic['topic']['name']}/partitions/{partition:010d}/"
        for topic in topics.values()
        for partition in range(int(topic["topic"]["num_partitions"]))
    ]


def repair_storage(storage: str, env: Mapping[str, str] | None = None) -> list[PartitionRepair]:
    """Repair every partition stored at ``storage`` (``s3://bucket/``) before a broker starts
    on it; logs ``broker_storage_repaired`` for each partition it changed."""
    bucket = urlsplit(storage).netloc
    with S3.from_env(bucket, env) as s3:
        repairs = [repair_partition(s3, prefix) for prefix in _partitions(s3)]
    for repair in repairs:
        if not repair.changed:
            continue
        log.warning(
            "broker_storage_repaired",
            partition=repair.prefix,
            watermark_was=repair.watermark_was,
            watermark=repair.watermark,
            batches_kept_past_watermark=len(repair.chain),
            stale_deleted=len(repair.stale),
            stale_records=sum(repair.stale.values()),
            stale_first=min(repair.stale, default=None),
            broken_deleted=repair.broken,
            broken_records=repair.broken_records,
        )
    log.info("broker_storage_checked", storage=storage, partitions=len(repairs))
    return repairs
