"""The worker as its own process: `maniac worker` (run several: they share one group)."""

from __future__ import annotations

import asyncio
import signal

import structlog
from prometheus_client import start_http_server

from services.common.clickhouse import ClickHouse
from services.common.kafka import create_producer
from services.common.pricing import PriceCatalog
from services.common.runtime import (
    clickhouse_target,
    prepare_clickhouse,
    prepare_topics,
    require_bootstrap,
)
from services.common.settings import WorkerSettings
from services.worker.runner import Worker, create_worker_consumer

log = structlog.get_logger(__name__)


async def run(settings: WorkerSettings) -> None:
    bootstrap = require_bootstrap(settings)
    clickhouse = ClickHouse.connect(clickhouse_target(settings))
    await prepare_clickhouse(clickhouse, settings)
    await prepare_topics(bootstrap, settings)
    producer = create_producer(bootstrap)
    consumer = create_worker_consumer(bootstrap, settings)
    await producer.start()
    await consumer.start()
    worker = Worker(
        settings, consumer, producer, clickhouse, prices=PriceCatalog.load(settings.pricing_file)
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, worker.stop)
    metrics = start_http_server(settings.metrics_port)[0] if settings.metrics_port else None
    log.info("worker_metrics", port=settings.metrics_port or None)
    try:
        await worker.run()
    finally:
        if metrics is not None:
            metrics.shutdown()
        await consumer.stop()
        await producer.stop()
        clickhouse.close()
