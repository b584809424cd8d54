"""Start-up steps every service shares: connect, migrate, create topics, load keys."""

from __future__ import annotations

import asyncio
import gc
import time

import structlog
from clickhouse_connect.driver.exceptions import OperationalError

from services.common.auth import KeyStore, RevokedKey, parse_seed
from services.common.clickhouse import ClickHouse, ClickHouseTarget
from services.common.kafka import broker_reachable, ensure_topics
from services.common.logging import first_line
from services.common.migrations import SchemaNotReady, migrate, wait_for_schema
from services.common.settings import CommonSettings

log = structlog.get_logger(__name__)

GC_THRESHOLDS = (100_000, 100, 100)


def tune_gc() -> None:
    """Garbage collection for a long-running service that allocates per request.

    What exists at start-up (modules, the app, pydantic's validators) lives until exit: frozen,
    the collector stops scanning it. A register request of 1000 items allocates some 60,000
    short-lived containers, alive while the request is validated and published. A young
    collection in the middle of one promotes them all, and older collections then scan them
    again: with the default thresholds (700, 10, 10) that set off full collections of 150-250 ms
    every few seconds under ingest, and with (5,000, 50, 100) the collector still took 8 us per
    registered item (1000 x 8 clients, ``bench/ingest.py``). With 100,000 a young collection
    comes after more than a whole request, so most of what a request makes is freed by its
    reference count before any collection sees it: 1.4 us per item. Almost nothing a request
    makes is cyclic, so memory stays flat; a young collection scans at most 100,000 objects
    (about 1.5 ms).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def clickhouse_target(settings: CommonSettings) -> ClickHouseTarget:
    if settings.clickhouse_url:
        return ClickHouseTarget.parse(settings.clickhouse_url)
    return ClickHouseTarget.embedded(settings.data_dir)


def require_bootstrap(settings: CommonSettings) -> str:
    if not settings.kafka_bootstrap:
        raise SystemExit(
            "MANIAC_KAFKA_BOOTSTRAP is not set: point it at a Kafka broker (host:port), "
            "or use `maniac serve`, which starts an embedded one."
        )
    return settings.kafka_bootstrap


class NotReady(RuntimeError):
    """What a service needs at start-up did not answer within ``MANIAC_MIGRATIONS_WAIT_S``."""


async def wait_for_dependencies(
    settings: CommonSettings, *, broker: bool, poll_s: float = 2.0
) -> None:
    """Return once what a service on its own needs answers: a ClickHouse server with every
    migration applied, then the broker when ``broker``; :class:`NotReady` after
    ``MANIAC_MIGRATIONS_WAIT_S`` without.

    On a cluster the services may start before ClickHouse, the broker or ``maniac migrate``
    (Kubernetes has no start order): they wait, saying what for, instead of failing with a
    traceback and being restarted until everything is up. A ``chdb://`` directory has no server
    to wait for: it opens in the service itself.
    """
    deadline = time.monotonic() + settings.migrations_wait_s

    def left() -> float:
        return deadline - time.monotonic()

    target = clickhouse_target(settings)
    if target.interface != "chdb":
        while True:
            try:
                clickhouse = await asyncio.to_thread(ClickHouse.connect, target)
                break
            except OperationalError as exc:
                if left() <= 0:
                    raise NotReady(f"ClickHouse cannot be reached: {first_line(exc)}") from exc
                log.info("waiting_for_clickhouse", reason=first_line(exc), left_s=round(left(), 1))
                await asyncio.sleep(min(poll_s, left()))
        try:
            await wait_for_schema(clickhouse, timeout_s=max(left(), 0.0), poll_s=poll_s)
        except SchemaNotReady as exc:
            raise NotReady(str(exc)) from exc
        finally:
            clickhouse.close()
    if broker:
        bootstrap = require_bootstrap(settings)
        while not await broker_reachable(bootstrap):
            if left() <= 0:
                raise NotReady(f"Kafka cannot be reached at {bootstrap}")
            log.info("waiting_for_broker", bootstrap=bootstrap, left_s=round(left(), 1))
            await asyncio.sleep(min(poll_s, left()))


async def prepare_clickhouse(
    clickhouse: ClickHouse,
    settings: CommonSettings,
    *,
    apply_migrations: bool = False,
    keys_client: ClickHouse | None = None,
) -> KeyStore:
    """Migrations in place, ``MANIAC_API_KEYS`` seeded; the loaded key store, which reads
    through ``keys_client`` when given (a client that no insert holds up).

    Only ``maniac serve``, the one process of its embedded database, applies the migrations
    itself; a service on its own waits for ``maniac migrate`` to have applied them (several
    start at once on a cluster, and must not migrate side by side).
    """
    if apply_migrations:
        await migrate(clickhouse)
    else:
        await wait_for_schema(clickhouse, timeout_s=settings.migrations_wait_s)
    keys = KeyStore(keys_client or clickhouse, refresh_s=settings.keys_refresh_s)
    if settings.api_keys is not None:
        for project, key in parse_seed(settings.api_keys.get_secret_value()):
            try:
                await keys.add(project, key)
            except RevokedKey as exc:  # revoked since it was seeded: it stays revoked
                log.warning("api_key_seed_revoked", project=project, reason=str(exc))
    await keys.load()
    return keys


SERVICE_PARTITIONS = 4
"""Partitions of the topics a service on its own creates: up to this many workers share them."""

SERVE_PARTITIONS = 1
"""Partitions of the topics ``maniac serve`` creates.

Its one worker reads every partition anyway. With one partition, a register request goes to the
broker as one record batch instead of one per partition, and the worker reads records in the
order they were acknowledged, so none waits behind another partition's (``bench/README.md``).
"""


async def prepare_topics(
    bootstrap: str, settings: CommonSettings, *, partitions: int = SERVICE_PARTITIONS
) -> None:
    """Create the completions and dead-letter topics that do not exist yet, with
    ``MANIAC_TOPIC_PARTITIONS`` partitions, or ``partitions`` when that is unset."""
    await ensure_topics(
        bootstrap,
        [settings.topic, settings.dead_letter_topic],
        settings.topic_partitions or partitions,
        settings.topic_replication_factor,
    )
