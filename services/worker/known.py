"""Which completions may be stored already: the 64-bit hashes of every stored (project, id).

For each batch the worker asks ClickHouse which of its completions are stored, and in which
version (its deduplication). Providers' ids look random, so a batch's ids fall into every
granule of the project, and that question reads the project's whole id column: its cost grows
with the project (``python -m bench.dedup``). Most ids of an import are new. This set says "not
stored" for them without asking ClickHouse; only the ids whose hash it holds (registered or
delivered again) are asked. Even one id asked reads a granule of every part, so the set is
exact up to a collision of 64-bit hashes (with 10,000,000 stored, about one batch of 5,000 new
ids in 370 million has one), not a Bloom filter, whose false positives would leave most
batches with a few ids to ask: 8 bytes per stored completion.

An id whose hash it does not hold was never stored, as long as it holds every completion
stored when it was loaded (:func:`load_known` reads ``completions``), the worker adds a batch's
ids when it asks about them, before they are inserted, every write goes through a worker that
knows it (as the aggregates already require, see README), and a worker loads it again when it
is given partitions another worker wrote.

A worker given some of the topic's partitions holds only the completions whose message key
(``project/completion_id``) Kafka's default partitioner puts into them, for the partition
count its consumer knows (:class:`Scope`), and asks about every other id. That stays exact
whatever the count: an id it does not ask about is one the set was loaded for, and no other
worker stores it as long as all records of a completion reach one partition, which the set
relied on already. The gateway (the only producer) partitions that way, so workers sharing a
topic share its completions out, one standing by holds none, and the ids asked are those of
records put elsewhere (or written before the topic got more partitions).

The hash is the first 8 bytes of MD5 of ``project NUL completion_id``, little-endian: ClickHouse
computes it for what is stored (:data:`STORED_HASHES`), Python for a batch. The hashes are kept
in sorted arrays of geometrically decreasing size (a log-structured merge): a batch's are sorted
into a small one, and an array at least half the size of the one before it is merged into it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import structlog

from schemas.events import MESSAGE_KEY_SQL, message_key
from services.common.clickhouse import ClickHouse
from services.common.kafka import partitions_of

log = structlog.get_logger(__name__)

HASH_BYTES = 8
STORED_HASHES = (
    "SELECT reinterpretAsUInt64(MD5(concat(project, '\\0', completion_id))) "
    "FROM {database}.completions"
)
"""Every stored row's hash (retractions and older versions only repeat a completion's)."""

IN_SCOPE = (
    f" WHERE kafkaMurmurHash({MESSAGE_KEY_SQL}) % {{partitions:UInt32}}"
    " IN {assigned:Array(UInt32)}"
)
"""The rows whose message key the default partitioner puts into the assigned partitions:
ClickHouse's ``kafkaMurmurHash`` is Kafka's murmur2 without its sign bit."""

Hashes = npt.NDArray[np.uint64]


def hashes(project: str, ids: Iterable[str]) -> Hashes:
    prefix = project.encode() + b"\0"
    digests = b"".join(hashlib.md5(prefix + i.encode()).digest()[:HASH_BYTES] for i in ids)
    return _as_hashes(digests)


def _as_hashes(data: bytes) -> Hashes:
    return np.frombuffer(data, dtype="<u8").astype(np.uint64)


@dataclass(frozen=True)
class Scope:
    """The completions of some partitions of a topic: those whose message key Kafka's default
    partitioner puts into ``assigned``, of ``partitions``."""

    partitions: int
    assigned: frozenset[int]

    def covers(self, project: str, ids: Sequence[str]) -> npt.NDArray[np.bool_]:
        """Whether each of these completions is in the scope."""
        keys = [message_key(project, i) for i in ids]
        return np.isin(partitions_of(keys, self.partitions), list(self.assigned))

    @property
    def parameters(self) -> dict[str, Any]:
        return {"partitions": self.partitions, "assigned": sorted(self.assigned)}


class KnownIds:
    """The completions that may be stored, with no false negatives (see the module).

    ``scope``: the completions it holds, all of them when None; any other may be stored."""

    def __init__(self, scope: Scope | None = None) -> None:
        self.scope = scope
        self._levels: list[Hashes] = []
        """Sorted arrays, each less than half the size of the one before it."""

    @property
    def count(self) -> int:
        """Hashes held (a completion added twice may count twice)."""
        return sum(len(level) for level in self._levels)

    @property
    def nbytes(self) -> int:
        return sum(level.nbytes for level in self._levels)

    def add_hashes(self, values: Hashes) -> None:
        if not len(values):
            return
        levels = self._levels
        levels.append(np.sort(values))
        while len(levels) > 1 and 2 * len(levels[-1]) >= len(levels[-2]):
            last = levels.pop()
            # two sorted runs: a stable sort (timsort) merges them in linear time
            levels[-1] = np.sort(np.concatenate((levels[-1], last)), kind="stable")

    def add(self, project: str, ids: Sequence[str]) -> None:
        self.add_hashes(hashes(project, ids))

    def holds(self, values: Hashes) -> npt.NDArray[np.bool_]:
        """Whether the set holds each of these hashes."""
        order = np.argsort(values)
        needles = values[order]  # in order, the searches walk each level once
        in_order = np.zeros(len(values), dtype=bool)
        for level in self._levels:
            at = np.minimum(np.searchsorted(level, needles), len(level) - 1)
            in_order |= level[at] == needles
        held = np.empty_like(in_order)
        held[order] = in_order
        return held

    def maybe_stored(
        self,
        project: str,
        ids: Sequence[str],
        values: Hashes | None = None,
        held: npt.NDArray[np.bool_] | None = None,
    ) -> list[str]:
        """Those of ``ids`` that may be stored; every other one certainly is not. ``values``:
        their hashes, and ``held``: :meth:`holds` of them, if the caller has them already."""
        if not ids:
            return []
        if values is None:
            values = hashes(project, ids)
        found = self.holds(values) if held is None else held.copy()
        if self.scope is not None:
            found |= ~self.scope.covers(project, ids)
        return [i for i, hit in zip(ids, found.tolist(), strict=True) if hit]


async def load_known(clickhouse: ClickHouse, scope: Scope | None = None) -> KnownIds:
    """The hashes of every completion stored now (of ``scope``, if given)."""
    known = KnownIds(scope)
    if scope is None:
        sql, parameters = STORED_HASHES, {}
    else:
        sql, parameters = STORED_HASHES + IN_SCOPE, scope.parameters
    if scope is None or scope.assigned:
        await clickhouse.read_row_binary(
            sql, HASH_BYTES, lambda chunk: known.add_hashes(_as_hashes(chunk)), parameters
        )
    log.info(
        "known_ids_loaded",
        hashes=known.count,
        mb=round(known.nbytes / 2**20, 1),
        partitions="all" if scope is None else sorted(scope.assigned),
    )
    return known
