"""Faults caused for real: the broker goes away and comes back; a worker is killed."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import re
import signal
from pathlib import Path

import httpx

from services.common.kafka import EmbeddedBroker, create_producer, ensure_topics
from services.common.settings import ServeSettings
from tests.conftest import eventually, unique
from tests.e2e.conftest import KEY_A, StackFactory
from tests.support.proxy import FreezableProxy, proxied_broker
from tests.support.serve import Serve, start_serve
from tests.support.worker import event, produce

ITEMS = {"container": "c", "items": [{"input": {"messages": []}, "tags": ["fault"]}]}


async def test_broker_down_register_is_503_readiness_false_then_recovers(
    start_stack: StackFactory, settings: ServeSettings
) -> None:
    broker = EmbeddedBroker()
    broker.start()
    try:
        # the embedded broker restarts empty (offsets start again at 0), so the shutdown drain
        # cannot match what was acknowledged before: keep it short
        running = await start_stack(
            bootstrap=broker.bootstrap, publish_timeout_s=2.0, drain_timeout_s=2.0
        )
        async with running.client(KEY_A) as client:
            assert (await client.post("/v1/chat/completions/register", json=ITEMS)).is_success
            broker.kill()

            response = await client.post("/v1/chat/completions/register", json=ITEMS)
            assert response.status_code == 503
            error = response.json()["error"]
            assert error["code"] == "service_unavailable"
            assert "Retry" in error["message"]
            ready = await client.get("/readyz")
            assert ready.status_code == 503
            assert ready.json()["checks"]["broker"] is False
            assert (await client.get("/healthz")).status_code == 200

            # the broker comes back (empty: the embedded one keeps nothing in memory)
            broker.start()
            await ensure_topics(broker.bootstrap, [settings.topic, settings.dead_letter_topic], 4)

            async def accepted() -> bool:
                again = await client.post("/v1/chat/completions/register", json=ITEMS)
                return again.status_code == 200

            await eventually(accepted, timeout_s=60, interval_s=0.5)
            assert (await client.get("/readyz")).status_code == 200
    finally:
        broker.stop()


async def _total(client: httpx.AsyncClient) -> int:
    response = await client.get("/v1/chat/completions", params={"limit": 1})
    assert response.status_code == 200, response.text
    return int(response.json()["total"])


async def _stable_total(client: httpx.AsyncClient, quiet_s: float = 1.5) -> int:
    """The total once it has stopped changing for ``quiet_s``."""
    last, since = await _total(client), asyncio.get_running_loop().time()
    while asyncio.get_running_loop().time() - since < quiet_s:
        await asyncio.sleep(0.1)
        now = await _total(client)
        if now != last:
            last, since = now, asyncio.get_running_loop().time()
    return last


def _metric(text: str, name: str) -> float:
    found = re.search(rf"^{name} ([0-9.e+]+)$", text, re.MULTILINE)
    assert found, f"{name} not in /metrics"
    return float(found.group(1))


async def test_worker_killed_after_insert_before_commit_loses_and_doubles_nothing(
    tmp_path: Path, env: dict[str, str], servers: list[Serve]
) -> None:
    """SIGKILL lands while a stored batch's commit is in flight: the batch is redelivered to
    the next process, which must store nothing twice (list, total and aggregates)."""
    n = 20_000
    topic = unique("kill")
    async with proxied_broker() as (proxy, bootstrap):
        await ensure_topics(bootstrap, [topic, f"{topic}.dlq"], partitions=4)
        usage = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
        messages = [
            event(f"k-{i}", project="projA", created=1_750_000_000 + i, usage=usage)
            for i in range(n)
        ]
        producer = create_producer(bootstrap)
        await producer.start()
        try:
            await produce(producer, topic, messages)
        finally:
            await producer.stop()

        env = {
            **env,
            "MANIAC_KAFKA_BOOTSTRAP": bootstrap,
            "MANIAC_TOPIC": topic,
            "MANIAC_DEAD_LETTER_TOPIC": f"{topic}.dlq",
            "MANIAC_CONSUMER_GROUP": unique("group"),
            "MANIAC_API_KEYS": "projA:key-a",
            "MANIAC_BATCH_MAX_ROWS": "500",
        }
        first = await start_serve(servers, tmp_path / "data", env)
        async with httpx.AsyncClient(base_url=first.url, headers=KEY_A) as client:
            await eventually(lambda: _above(client, 1_000), timeout_s=60, interval_s=0.02)
            # From here every byte towards the broker is held: the worker stores what it has
            # fetched, up to the first batch whose commit cannot get through, and stops there.
            proxy.freeze()
            stored_before_kill = await _stable_total(client)
        assert 0 < stored_before_kill < n
        assert first.stop(signal.SIGKILL) == -signal.SIGKILL
        await eventually(lambda: _no_connections(proxy), timeout_s=10)
        proxy.thaw()  # the held commit died with its connection

        second = await start_serve(servers, tmp_path / "data", env)
        async with httpx.AsyncClient(base_url=second.url, headers=KEY_A) as client:
            await eventually(lambda: _is_total(client, n), timeout_s=120, interval_s=0.2)
            metrics = (await client.get("/metrics")).text
            # redelivered rows that the killed process had already stored were recognised
            assert _metric(metrics, "maniac_worker_duplicates_skipped_total") > 0
            await asyncio.sleep(1)  # nothing more arrives later
            assert await _total(client) == n
            usage_rows = (
                await client.get(
                    "/v1/usage",
                    params={"from": "2025-06-15", "to": "2025-06-16", "granularity": "day"},
                )
            ).json()["data"]
            assert sum(row["requests"] for row in usage_rows) == n
            assert sum(row["total_tokens"] for row in usage_rows) == 15 * n
            page = (await client.get("/v1/chat/completions", params={"limit": 100})).json()
            ids = [c["id"] for c in page["data"]]
            assert len(ids) == len(set(ids)) == 100
        assert second.stop() == 0


async def _above(client: httpx.AsyncClient, n: int) -> bool:
    return await _total(client) > n


async def _is_total(client: httpx.AsyncClient, n: int) -> bool:
    return await _total(client) == n


async def _no_connections(proxy: FreezableProxy) -> bool:
    return proxy.connections == 0


async def test_a_worker_that_stops_on_an_error_is_started_again_and_stores_what_follows(
    start_stack: StackFactory,
) -> None:
    running = await start_stack(worker_processes=1)

    def items(first: int) -> dict[str, object]:
        return {
            "container": "c",
            "items": [{"input": {"messages": []}, "tags": [f"t{first + i}"]} for i in range(5)],
        }

    async with running.client(KEY_A) as client:
        assert (await client.post("/v1/chat/completions/register", json=items(0))).is_success
        await eventually(lambda: _is_total(client, 5), timeout_s=30)
        # the worker's child process dies (the OOM killer, say): its pool is broken, and the
        # worker stops on the next batch with BrokenProcessPool
        children = multiprocessing.active_children()
        assert children
        for child in children:
            os.kill(child.pid or 0, signal.SIGKILL)
        assert (await client.post("/v1/chat/completions/register", json=items(5))).is_success
        await eventually(lambda: _is_total(client, 10), timeout_s=60, interval_s=0.2)
        metrics = (await client.get("/metrics")).text
        assert _metric(metrics, "maniac_worker_failures_total") >= 1
