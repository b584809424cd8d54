"""GET /v1/status and the per-project loss metrics, through the whole stack over HTTP."""

from __future__ import annotations

from typing import Any

import openai
from prometheus_client import REGISTRY

from services.common.kafka import create_producer
from services.common.settings import ServeSettings
from tests.conftest import Broker, eventually
from tests.e2e.conftest import KEY_A, KEY_B, RunningStack
from tests.support.upstream import ANSWER
from tests.support.worker import produce


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def _status(api: RunningStack, headers: dict[str, str]) -> dict[str, Any]:
    async with api.client(headers) as client:
        response = await client.get("/v1/status")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def _items(n: int) -> dict[str, Any]:
    return {
        "container": "c",
        "items": [
            {"input": {"messages": []}, "output": {"id": f"status-{i}", "choices": []}}
            for i in range(n)
        ],
    }


async def test_status_shows_lag_stored_and_dead_letters_of_the_callers_project_only(
    api: RunningStack, settings: ServeSettings, broker: Broker
) -> None:
    dead_before = _sample("maniac_project_records_dead_lettered_total", project="projA")
    acked_before = _sample("maniac_project_records_acknowledged_total", project="projA")
    lag_before = _sample("maniac_ingestion_lag_seconds_count", project="projA")
    async with api.client(KEY_A) as client:
        response = await client.post("/v1/chat/completions/register", json=_items(3))
        assert response.json()["summary"]["accepted"] == 3
    # a poison message, as a broken producer would send it: its key still names the project
    producer = create_producer(broker.bootstrap, linger_ms=0)
    await producer.start()
    try:
        await produce(producer, settings.topic, [(b"projA/poisoned", b"{not json")])
    finally:
        await producer.stop()

    async def settled() -> bool:
        status = await _status(api, KEY_A)
        return bool(status["stored_last_hour"] == 3 and status["dead_lettered"]["total"] == 1)

    await eventually(settled)
    status = await _status(api, KEY_A)
    assert status["object"] == "status"
    assert status["project"] == "projA"
    lag = status["ingestion_lag_ms"]
    assert lag["window"] == "1h"
    assert 0 <= lag["p50"] <= lag["p99"] <= lag["max"] < 60_000
    dead = status["dead_lettered"]
    assert (dead["total"], dead["last_24h"], dead["replayed"]) == (1, 1, 0)
    [(reason, count)] = dead["by_reason"].items()
    assert reason.startswith("not JSON")
    assert count == 1
    assert status["dropped"] == {"total": 0, "last_24h": 0, "by_reason": {}}
    assert status["pending"]["scope"] == "all projects"
    assert status["pending"]["records"] == 0  # everything published is stored or dead

    other = await _status(api, KEY_B)
    assert other["project"] == "projB"
    assert other["stored_last_hour"] == 0
    assert other["ingestion_lag_ms"] == {"p50": None, "p99": None, "max": None, "window": "1h"}
    assert other["dead_lettered"]["total"] == 0
    assert other["dead_lettered"]["by_reason"] == {}

    assert _sample("maniac_project_records_dead_lettered_total", project="projA") == (
        dead_before + 1
    )
    assert _sample("maniac_project_records_acknowledged_total", project="projA") == (
        acked_before + 3
    )
    assert _sample("maniac_ingestion_lag_seconds_count", project="projA") == lag_before + 3
    async with api.client() as client:
        metrics = (await client.get("/metrics")).text
        assert 'maniac_project_records_dead_lettered_total{project="projA"}' in metrics
        assert 'maniac_ingestion_lag_seconds_bucket{le="0.5",project="projA"}' in metrics
        anonymous = await client.get("/v1/status")
    assert anonymous.status_code == 401
    assert anonymous.json()["error"]["code"] == "unauthorized"


async def test_dropped_telemetry_shows_in_metrics_and_in_status(
    api_broker_gone: RunningStack,
) -> None:
    running = api_broker_gone
    before = _sample("maniac_project_records_dropped_total", project="projA", reason="broker_error")
    sdk = openai.AsyncOpenAI(base_url=f"{running.base_url}/v1", api_key="key-a", max_retries=0)
    async with sdk:
        completion = await sdk.chat.completions.create(
            model="mock/ok", messages=[{"role": "user", "content": "anyone recording?"}]
        )
    assert completion.choices[0].message.content == ANSWER
    assert running.stack.publisher is not None
    await running.stack.publisher.flush(timeout_s=15)
    assert _sample(
        "maniac_project_records_dropped_total", project="projA", reason="broker_error"
    ) == (before + 1)

    async def recorded() -> bool:
        dropped = (await _status(running, KEY_A))["dropped"]
        return bool(dropped["total"] == 1)

    await eventually(recorded)
    status = await _status(running, KEY_A)
    assert status["dropped"] == {"total": 1, "last_24h": 1, "by_reason": {"broker_error": 1}}
    assert (await _status(running, KEY_B))["dropped"]["total"] == 0
