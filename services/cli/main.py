"""`maniac`: one entry point for every service and admin task.

maniac serve                     everything in one process, embedded broker and ClickHouse
maniac gateway | worker | query  one service, against MANIAC_KAFKA_BOOTSTRAP/CLICKHOUSE_URL
maniac migrate                   apply ClickHouse migrations
maniac keys create --project P   print a new API key (once)
maniac keys list | revoke KEY_ID
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from services.common.logging import configure_logging
from services.common.settings import (
    CommonSettings,
    GatewaySettings,
    QuerySettings,
    ServeSettings,
    WorkerSettings,
)


def _settings(cls: type[CommonSettings], args: argparse.Namespace) -> Any:
    overrides: dict[str, Any] = {}
    for name in ("host", "port", "data_dir"):
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = value
    settings = cls(**overrides)
    configure_logging(settings.log_format, settings.log_level)
    return settings


def _serve_uvicorn(app: Any, host: str, port: int) -> None:
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_config=None, access_log=False)


def cmd_serve(args: argparse.Namespace) -> int:
    from services.common.clickhouse import ClickHouse
    from services.common.kafka import EmbeddedBroker
    from services.common.runtime import clickhouse_target
    from services.stack import Stack

    settings: ServeSettings = _settings(ServeSettings, args)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    broker: EmbeddedBroker | None = None
    bootstrap = settings.kafka_bootstrap
    if not bootstrap:
        broker = EmbeddedBroker(log_file=settings.data_dir / "broker.log")
        broker.start()
        bootstrap = broker.bootstrap
    clickhouse = ClickHouse.connect(clickhouse_target(settings))
    try:
        stack = Stack(settings, clickhouse, bootstrap, create_dev_key=True)
        _serve_uvicorn(stack.create_app(), settings.host, settings.port)
    finally:
        clickhouse.close()
        if broker is not None:
            broker.stop()
    return 0


def cmd_gateway(args: argparse.Namespace) -> int:
    from services.gateway.app import create_app

    settings: GatewaySettings = _settings(ServeSettings, args)
    _serve_uvicorn(create_app(settings), args.host or "0.0.0.0", args.port or 8000)
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    from services.query.app import create_app

    settings: QuerySettings = _settings(ServeSettings, args)
    _serve_uvicorn(create_app(settings), args.host or "0.0.0.0", args.port or 8001)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from services.worker.main import run

    settings: WorkerSettings = _settings(WorkerSettings, args)
    asyncio.run(run(settings))
    return 0


async def _with_clickhouse(args: argparse.Namespace, action: str) -> int:
    from services.common.auth import KeyStore
    from services.common.clickhouse import ClickHouse
    from services.common.migrations import migrate
    from services.common.runtime import clickhouse_target

    settings: CommonSettings = _settings(CommonSettings, args)
    clickhouse = ClickHouse.connect(clickhouse_target(settings))
    try:
        applied = await migrate(clickhouse)
        keys = KeyStore(clickhouse)
        if action == "migrate":
            print(f"applied migrations: {applied or 'none (up to date)'}")  # noqa: T201
        elif action == "create":
            key = await keys.create(args.project)
            print(key)  # noqa: T201
        elif action == "list":
            for kid, project in await keys.list():
                print(f"{kid}\t{project}")  # noqa: T201
        elif action == "revoke":
            revoked = await keys.revoke(args.key_id)
            print(f"revoked {revoked} key(s)")  # noqa: T201
            return 0 if revoked else 1
    finally:
        clickhouse.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maniac", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def service(name: str, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_)
        p.add_argument("--host", default=None)
        p.add_argument("--port", type=int, default=None)
        p.add_argument("--data-dir", type=Path, default=None, dest="data_dir")
        return p

    service("serve", "gateway, workers and query service in one process").set_defaults(
        func=cmd_serve
    )
    service("gateway", "the gateway (register, create)").set_defaults(func=cmd_gateway)
    service("query", "the query service (list, get)").set_defaults(func=cmd_query)
    worker = sub.add_parser("worker", help="a consumer worker")
    worker.add_argument("--data-dir", type=Path, default=None, dest="data_dir")
    worker.set_defaults(func=cmd_worker)

    migrate = sub.add_parser("migrate", help="apply ClickHouse migrations")
    migrate.add_argument("--data-dir", type=Path, default=None, dest="data_dir")
    migrate.set_defaults(func=lambda a: asyncio.run(_with_clickhouse(a, "migrate")))

    keys = sub.add_parser("keys", help="manage API keys")
    keys.add_argument("--data-dir", type=Path, default=None, dest="data_dir")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="create a key and print it once")
    create.add_argument("--project", required=True)
    create.set_defaults(func=lambda a: asyncio.run(_with_clickhouse(a, "create")))
    keys_sub.add_parser("list", help="list key ids and projects").set_defaults(
        func=lambda a: asyncio.run(_with_clickhouse(a, "list"))
    )
    revoke = keys_sub.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("key_id")
    revoke.set_defaults(func=lambda a: asyncio.run(_with_clickhouse(a, "revoke")))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
