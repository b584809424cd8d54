"""Faults caused for real: the broker goes away and comes back."""

from __future__ import annotations

from services.common.kafka import EmbeddedBroker, ensure_topics
from services.common.settings import ServeSettings
from tests.conftest import eventually
from tests.e2e.conftest import KEY_A, StackFactory

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
