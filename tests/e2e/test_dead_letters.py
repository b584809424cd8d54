"""Dead letters over HTTP: each project lists and replays its own (how `maniac serve` users do)."""

from __future__ import annotations

from typing import Any

from services.common.kafka import create_producer
from services.common.settings import ServeSettings
from tests.conftest import Broker, eventually
from tests.e2e.conftest import KEY_A, KEY_B, RunningStack
from tests.support.worker import event


async def _old_dead_letters(broker: Broker, settings: ServeSettings) -> None:
    """Valid under today's code, dead-lettered by an older worker (as it did, with headers)."""
    producer = create_producer(broker.bootstrap, linger_ms=0)
    await producer.start()
    try:
        for offset, project in enumerate(("projA", "projB")):
            key, value = event(f"old-{project}", project=project)
            headers = [
                ("reason", b"invalid event at item: fixed since"),
                ("source_topic", settings.topic.encode()),
                ("source_partition", b"1"),
                ("source_offset", str(500 + offset).encode()),
            ]
            await (
                await producer.send(
                    settings.dead_letter_topic, key=key, value=value, headers=headers
                )
            )
    finally:
        await producer.stop()


async def test_a_project_replays_its_own_dead_letters_once_and_lists_them(
    api: RunningStack, settings: ServeSettings, broker: Broker
) -> None:
    await _old_dead_letters(broker, settings)
    async with api.client(KEY_A) as a, api.client(KEY_B) as b:
        dry = await a.post("/v1/dead_letters/replay", params={"dry_run": "true"})
        assert dry.status_code == 200, dry.text
        assert dry.json() == {
            "object": "dead_letters.replay",
            "project": "projA",
            "selected": 1,
            "already_replayed": 0,
            "replayed": 1,
            "dry_run": True,
        }
        assert (await a.get("/v1/chat/completions/old-projA")).status_code == 404

        first = (await a.post("/v1/dead_letters/replay", params={"reason": "FIXED"})).json()
        assert (first["selected"], first["replayed"]) == (1, 1)

        async def stored() -> bool:
            return (await a.get("/v1/chat/completions/old-projA")).status_code == 200

        await eventually(stored)
        again = (await a.post("/v1/dead_letters/replay")).json()
        assert (again["already_replayed"], again["replayed"]) == (1, 0)

        listed: list[dict[str, Any]] = (await a.get("/v1/dead_letters")).json()["data"]
        assert [(d["completion_id"], d["source"]) for d in listed] == [
            ("old-projA", f"{settings.topic}/1/500")
        ]
        assert listed[0]["replayed_at"] is not None
        assert listed[0]["reason"] == "invalid event at item: fixed since"
        status = (await a.get("/v1/status")).json()
        assert status["dead_lettered"]["replayed"] == 1

        # projB saw nothing of projA's, and its own dead letter is still there to replay
        assert (await b.get("/v1/dead_letters")).json()["data"] == []
        assert (await b.get("/v1/chat/completions/old-projB")).status_code == 404
        own = (await b.post("/v1/dead_letters/replay")).json()
        assert (own["project"], own["selected"], own["replayed"]) == ("projB", 1, 1)

    async with api.client() as anonymous:
        assert (await anonymous.post("/v1/dead_letters/replay")).status_code == 401
        assert (await anonymous.get("/v1/dead_letters")).status_code == 401
