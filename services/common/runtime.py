"""Start-up steps every service shares: connect, migrate, create topics, load keys."""

from __future__ import annotations

from services.common.auth import KeyStore, parse_seed
from services.common.clickhouse import ClickHouse, ClickHouseTarget
from services.common.kafka import ensure_topics
from services.common.migrations import migrate
from services.common.settings import CommonSettings


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


async def prepare_clickhouse(clickhouse: ClickHouse, settings: CommonSettings) -> KeyStore:
    """Apply migrations, seed ``MANIAC_API_KEYS``, and return the loaded key store."""
    await migrate(clickhouse)
    keys = KeyStore(clickhouse, refresh_s=settings.keys_refresh_s)
    if settings.api_keys is not None:
        for project, key in parse_seed(settings.api_keys.get_secret_value()):
            await keys.add(project, key)
    await keys.load()
    return keys


async def prepare_topics(bootstrap: str, settings: CommonSettings) -> None:
    await ensure_topics(
        bootstrap, [settings.topic, settings.dead_letter_topic], settings.topic_partitions
    )
