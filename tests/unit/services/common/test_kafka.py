"""The producer's partitioner: the same partition for a key as aiokafka's default one."""

from __future__ import annotations

import random

import pytest
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.partitioner import murmur2 as aiokafka_murmur2

from services.common.kafka import murmur2, partition_for_key, partitions_of

_RNG = random.Random(3)
KEYS = [bytes(_RNG.randrange(256) for _ in range(n)) for n in range(80) for _ in range(20)]
KEYS += [f"projA/chatcmpl-{n:032x}".encode() for n in range(500)]


def test_murmur2_is_kafkas() -> None:
    assert [murmur2(k) for k in KEYS] == [aiokafka_murmur2(k) for k in KEYS]


@pytest.mark.parametrize("partitions", [1, 3, 4, 12])
def test_a_key_goes_to_the_partition_the_default_partitioner_picks(partitions: int) -> None:
    every = list(range(partitions))
    default = DefaultPartitioner()
    assert [partition_for_key(k, every, every) for k in KEYS] == [
        default(k, every, every) for k in KEYS
    ]


@pytest.mark.parametrize("partitions", [1, 2, 3, 4, 12, 1000])
def test_many_keys_at_once_go_where_the_default_partitioner_puts_each(partitions: int) -> None:
    """Keys of every length from 0 to 79 (every tail of 0 to 3 bytes, NUL bytes included),
    in one call: each partition is the default partitioner's for that key."""
    every = list(range(partitions))
    default = DefaultPartitioner()
    shuffled = _RNG.sample(KEYS, len(KEYS))
    assert partitions_of(shuffled, partitions).tolist() == [
        default(k, every, every) for k in shuffled
    ]
    assert partitions_of([b"a\0\0", b"\0"], partitions).tolist() == [
        default(b"a\0\0", every, every),
        default(b"\0", every, every),
    ]
    assert partitions_of([], partitions).tolist() == []


def test_no_key_goes_to_an_available_partition() -> None:
    assert partition_for_key(None, [0, 1, 2, 3], [2]) == 2
