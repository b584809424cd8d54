"""Unit tests run without the broker or ClickHouse: any attempt to reach them fails loudly."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _no_infrastructure(monkeypatch: pytest.MonkeyPatch) -> None:
    def blocked(*_: object, **__: object) -> None:
        raise RuntimeError("unit tests must not use ClickHouse or Kafka; write an integration test")

    monkeypatch.setattr("clickhouse_connect.get_client", blocked)
    monkeypatch.setattr("services.common.kafka.EmbeddedBroker.start", blocked)
    monkeypatch.setattr("aiokafka.AIOKafkaProducer.start", blocked)
    monkeypatch.setattr("aiokafka.AIOKafkaConsumer.start", blocked)
