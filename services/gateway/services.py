"""The gateway's long-lived objects, built and closed in one place for every entry point."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from services.common.clickhouse import ClickHouse
from services.common.kafka import create_producer
from services.common.losses import LossRepository
from services.common.settings import GatewaySettings
from services.gateway.budget import BodyBudget
from services.gateway.completions import CompletionService
from services.gateway.dead_letters import DeadLetterReplayer
from services.gateway.drops import DropRecorder
from services.gateway.providers import Catalog
from services.gateway.publisher import Publisher
from services.gateway.upstream import UpstreamClient


@dataclass
class Gateway:
    producer: Any
    publisher: Publisher
    upstream: UpstreamClient
    completions: CompletionService
    drops: DropRecorder
    replayer: DeadLetterReplayer
    budget: BodyBudget

    @classmethod
    async def start(
        cls, settings: GatewaySettings, bootstrap: str, clickhouse: ClickHouse
    ) -> Gateway:
        catalog = Catalog.load(settings.providers_file)
        producer = create_producer(
            bootstrap,
            linger_ms=settings.producer_linger_ms,
            compression=settings.producer_compression,
            timeout_s=settings.publish_timeout_s,
        )
        await producer.start()
        losses = LossRepository(clickhouse)
        drops = DropRecorder(losses)
        publisher = Publisher(
            producer,
            settings.topic,
            settings.publish_timeout_s,
            settings.telemetry_queue_size,
            on_drop=drops.add,
            queue_bytes=settings.telemetry_queue_bytes,
        )
        upstream = UpstreamClient(settings.upstream_max_connections)
        completions = CompletionService(catalog, upstream, publisher)
        replayer = DeadLetterReplayer(settings, bootstrap, publisher, losses)
        budget = BodyBudget(settings.max_inflight_body_bytes, settings.project_budget_share)
        return cls(producer, publisher, upstream, completions, drops, replayer, budget)

    def state(self) -> dict[str, Any]:
        return {
            "publisher": self.publisher,
            "completion_service": self.completions,
            "dead_letter_replayer": self.replayer,
            "body_budget": self.budget,
        }

    async def stop(self) -> None:
        """Send what is queued, write drop records, then close the upstream pool and producer."""
        await self.publisher.flush()
        await self.drops.close()
        await self.upstream.aclose()
        await self.producer.stop()
