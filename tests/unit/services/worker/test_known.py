"""The set of known completion ids: never a false negative."""

from __future__ import annotations

import hashlib
import random

import numpy as np

from schemas.events import message_key
from services.common.kafka import partitions_of
from services.worker.known import KnownIds, Scope, hashes


def _ids(rng: random.Random, n: int) -> list[str]:
    return [f"chatcmpl-{rng.getrandbits(116):029x}" for _ in range(n)]


def test_every_id_added_is_known_and_no_other() -> None:
    rng = random.Random(1)
    known = KnownIds()
    added = _ids(rng, 300_000)
    for start in range(0, len(added), 5_000):  # as the worker adds them, a batch at a time
        known.add("p", added[start : start + 5_000])
        assert known.maybe_stored("p", added[start : start + 5_000]) == added[start : start + 5_000]
    assert known.count == len(added)
    assert known.maybe_stored("p", added) == added
    others = _ids(rng, 100_000)
    assert known.maybe_stored("p", others + added[:10]) == added[:10]


def test_it_keeps_a_few_sorted_arrays_each_under_half_the_one_before() -> None:
    known = KnownIds()
    rng = np.random.default_rng(2)
    for size in [1 << 20, 5_000, 5_000, 300, 70_000, 1, 1]:
        known.add_hashes(rng.integers(0, 2**64, size=size, dtype=np.uint64))
        sizes = [len(level) for level in known._levels]
        assert all(2 * later < earlier for earlier, later in zip(sizes, sizes[1:], strict=False))
        assert all((np.diff(level.astype(np.float64)) >= 0).all() for level in known._levels)
    assert known.count == (1 << 20) + 80_302
    assert known.nbytes == 8 * known.count


def test_ids_are_known_per_project() -> None:
    known = KnownIds()
    known.add("p", ["a", "b"])
    known.add("p", [])
    assert known.maybe_stored("p", ["a", "c", "b"]) == ["a", "b"]
    assert known.maybe_stored("q", ["a", "b"]) == []
    assert known.maybe_stored("p", []) == []
    assert KnownIds().maybe_stored("p", ["a"]) == []


def test_a_set_for_some_partitions_says_any_completion_outside_them_may_be_stored() -> None:
    known = KnownIds(Scope(4, frozenset({0, 2})))
    ids = _ids(random.Random(3), 2_000)
    partitions = partitions_of([message_key("p", i) for i in ids], 4).tolist()
    outside = {i for i, p in zip(ids, partitions, strict=True) if p not in (0, 2)}
    inside = [i for i in ids if i not in outside]
    assert 800 < len(inside) < 1_200
    known.add("p", inside[:300])
    added = set(inside[:300])
    assert known.maybe_stored("p", ids) == [i for i in ids if i in outside or i in added]
    assert known.maybe_stored("p", inside[300:]) == []


def test_the_hash_is_the_first_8_bytes_of_md5_of_project_nul_id_little_endian() -> None:
    digest = hashlib.md5("pé\0ünïcödé ✓".encode()).digest()
    assert hashes("pé", ["ünïcödé ✓"]).tolist() == [int.from_bytes(digest[:8], "little")]
    assert hashes("p", []).shape == (0,)
    assert hashes("p", ["x"]).dtype == np.uint64
