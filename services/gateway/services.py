"""The gateway's long-lived objects, built and closed in one place for every entry point."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from services.common.kafka import create_producer
from services.common.settings import GatewaySettings
from services.gateway.completions import CompletionService
from services.gateway.providers import Catalog
from services.gateway.publisher import Publisher
from services.gateway.upstream import UpstreamClient


@dataclass
class Gateway:
    producer: Any
    publisher: Publisher
    upstream: UpstreamClient
    completions: CompletionService

    @classmethod
    async def start(cls, settings: GatewaySettings, bootstrap: str) -> Gateway:
        catalog = Catalog.load(settings.providers_file)
        producer = create_producer(
            bootstrap,
            linger_ms=settings.producer_linger_ms,
            compression=settings.producer_compression,
            timeout_s=settings.publish_timeout_s,
        )
        await producer.start()
        publisher = Publisher(
            producer, settings.topic, settings.publish_timeout_s, settings.telemetry_queue_size
        )
        upstream = UpstreamClient(settings.upstream_max_connections)
        return cls(producer, publisher, upstream, CompletionService(catalog, upstream, publisher))

    def state(self) -> dict[str, Any]:
        return {"publisher": self.publisher, "completion_service": self.completions}

    async def stop(self) -> None:
        """Send what is queued, then close the upstream pool and the producer."""
        await self.publisher.flush()
        await self.upstream.aclose()
        await self.producer.stop()
