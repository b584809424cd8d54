"""`maniac`: one entry point for every service and admin task.

maniac serve                     everything in one process, embedded broker and ClickHouse
maniac gateway | worker | query  one service, against MANIAC_KAFKA_BOOTSTRAP/CLICKHOUSE_URL
maniac migrate                   apply ClickHouse migrations
maniac keys create --project P   print a new API key (once)
maniac keys list | revoke KEY_ID
maniac reprice --from T --to T   re-price history after a price correction
maniac rebuild [--check]         the list's index and the aggregates, again from completions
maniac dlq list | replay         dead letters: list them, replay them once fixed
maniac import FILE --container C register a JSONL file of examples through the API
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
import sys
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
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

_EXIT_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _settings(cls: type[CommonSettings], args: argparse.Namespace) -> Any:
    overrides: dict[str, Any] = {}
    for name in ("host", "port", "data_dir"):
        value = getattr(args, name, None)
        if value is not None and name in cls.model_fields:
            overrides[name] = value
    settings = cls(**overrides)
    configure_logging(settings.log_format, settings.log_level)
    return settings


def _serve_uvicorn(app: Any, host: str, port: int) -> None:
    """Serve until SIGINT/SIGTERM, shut down gracefully (draining), then return normally.

    uvicorn re-raises the signal after its graceful shutdown, which would kill this process
    before the embedded broker is stopped; here the signal only asks the server to exit.
    """
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            previous = {s: signal.signal(s, self.handle_exit) for s in _EXIT_SIGNALS}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    from services.common.runtime import tune_gc

    config = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False)
    tune_gc()
    Server(config).run()


def cannot_listen(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on now (as uvicorn will bind it), or None."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


def cmd_serve(args: argparse.Namespace) -> int:
    from services.common.clickhouse import ClickHouse
    from services.common.kafka import EmbeddedBroker
    from services.common.runtime import clickhouse_target
    from services.stack import Stack

    settings: ServeSettings = _settings(ServeSettings, args)
    # before anything starts: a first run would otherwise print its development key and stop
    busy = cannot_listen(settings.host, settings.port)
    if busy is not None:
        print(  # noqa: T201
            f"maniac serve cannot listen on {settings.host}:{settings.port} ({busy}): stop "
            "what uses it, or choose another port (MANIAC_PORT or --port).",
            file=sys.stderr,
        )
        return 2
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    clickhouse = ClickHouse.connect(clickhouse_target(settings))  # first: it may be in use
    broker: EmbeddedBroker | None = None
    try:
        bootstrap = settings.kafka_bootstrap
        if not bootstrap:
            broker = EmbeddedBroker(
                storage=settings.broker_storage, log_file=settings.data_dir / "broker.log"
            )
            broker.start()
            bootstrap = broker.bootstrap
        stack = Stack(settings, clickhouse, bootstrap, broker=broker, create_dev_key=True)
        _serve_uvicorn(stack.create_app(), settings.host, settings.port)
    finally:
        clickhouse.close()
        if broker is not None:
            broker.stop()
    return 0


def cmd_gateway(args: argparse.Namespace) -> int:
    from services.common.runtime import wait_for_dependencies
    from services.gateway.app import create_app

    settings: GatewaySettings = _settings(GatewaySettings, args)
    asyncio.run(wait_for_dependencies(settings, broker=True))
    _serve_uvicorn(create_app(settings), args.host or "0.0.0.0", args.port or 8000)
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    from services.common.runtime import wait_for_dependencies
    from services.query.app import create_app

    settings: QuerySettings = _settings(QuerySettings, args)
    asyncio.run(wait_for_dependencies(settings, broker=False))
    _serve_uvicorn(create_app(settings), args.host or "0.0.0.0", args.port or 8001)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from services.common.runtime import tune_gc, wait_for_dependencies
    from services.worker.main import run

    settings: WorkerSettings = _settings(WorkerSettings, args)
    asyncio.run(wait_for_dependencies(settings, broker=True))
    tune_gc()
    asyncio.run(run(settings))
    return 0


async def _with_clickhouse(args: argparse.Namespace, action: str) -> int:
    from services.common.auth import KeyStore
    from services.common.clickhouse import ClickHouse
    from services.common.migrations import migrate, missing_migrations
    from services.common.runtime import clickhouse_target

    settings: CommonSettings = _settings(CommonSettings, args)
    clickhouse = ClickHouse.connect(clickhouse_target(settings))
    try:
        if action == "migrate":
            applied = await migrate(clickhouse)
            print(f"applied migrations: {applied or 'none (up to date)'}")  # noqa: T201
            return 0
        # Only `maniac migrate` and `maniac serve` change the schema: an operator's command run
        # while a deploy migrates must not migrate beside it (backfills would run twice).
        missing = await missing_migrations(clickhouse)
        if missing:
            names = ", ".join(f"{m.version:04d}_{m.name}" for m in missing)
            print(  # noqa: T201
                f"The database {clickhouse.database!r} lacks migrations ({names}): run "
                "`maniac migrate` first (`maniac serve` applies them when it starts).",
                file=sys.stderr,
            )
            return 2
        keys = KeyStore(clickhouse)
        if action == "create":
            try:
                key = await keys.create(args.project)
            except ValueError as exc:
                print(exc, file=sys.stderr)  # noqa: T201
                return 2
            print(key)  # noqa: T201
        elif action == "list":
            for kid, project in await keys.list():
                print(f"{kid}\t{project}")  # noqa: T201
        elif action == "reprice":
            from services.common.pricing import PriceCatalog
            from services.worker.reprice import reprice

            if args.start >= args.end:
                print("--from must be before --to", file=sys.stderr)  # noqa: T201
                return 2
            result = await reprice(
                clickhouse,
                # the catalogue the workers price with: --pricing-file, else MANIAC_PRICING_FILE
                PriceCatalog.load(args.pricing_file or WorkerSettings().pricing_file),
                args.start,
                args.end,
                project=args.project,
                dry_run=args.dry_run,
            )
            print(  # noqa: T201
                f"examined {result.examined}, re-priced {result.changed}, spend changed by "
                f"{format(result.delta, 'f')}{' (dry run)' if args.dry_run else ''}"
            )
        elif action == "rebuild":
            from services.worker.rebuild import check, rebuild

            counts = await (check(clickhouse) if args.check else rebuild(clickhouse))
            for count in counts:
                print(  # noqa: T201
                    f"{count.table}: {count.found} of {count.expected} completions"
                    + (f", {count.differing} groups differ" if count.differing else "")
                    + ("" if count.ok else "  (differs: `maniac rebuild` fills it again)")
                )
            return 0 if all(count.ok for count in counts) else 1
        elif action == "dlq_list":
            from services.common.losses import LossRepository

            rows = await LossRepository(clickhouse).list_dead_letters(args.project, args.limit)
            for row in rows:
                state = f"replayed {row['replayed_at']}" if row["replayed_at"] else "dead"
                fields = (row["dead_at"], row["project"], row["completion_id"], row["source"])
                print(  # noqa: T201
                    "\t".join([*(str(f or "-") for f in fields), state, row["reason"]])
                )
        elif action == "dlq_replay":
            return await _replay(args, settings, clickhouse)
        elif action == "revoke":
            revoked = await keys.revoke(args.key_id)
            print(f"revoked {revoked} key(s)")  # noqa: T201
            return 0 if revoked else 1
    finally:
        clickhouse.close()
    return 0


async def _replay(args: argparse.Namespace, settings: CommonSettings, clickhouse: Any) -> int:
    from aiokafka.errors import KafkaError

    from services.common.kafka import create_producer
    from services.common.logging import first_line
    from services.common.losses import LossRepository
    from services.common.replay import producer_publish, replay

    if not settings.kafka_bootstrap:
        print(  # noqa: T201
            "MANIAC_KAFKA_BOOTSTRAP is not set. The embedded broker lives inside `maniac serve`: "
            "while it runs, replay through it with POST /v1/dead_letters/replay (see README).",
            file=sys.stderr,
        )
        return 2
    producer = create_producer(settings.kafka_bootstrap)
    try:
        await producer.start()
    except KafkaError as exc:  # a broker that does not answer: said, not a traceback
        await producer.stop()
        print(  # noqa: T201
            f"Kafka cannot be reached at {settings.kafka_bootstrap}: {first_line(exc)}",
            file=sys.stderr,
        )
        return 2
    try:
        result = await replay(
            bootstrap=settings.kafka_bootstrap,
            publish=producer_publish(producer, settings.topic),
            losses=LossRepository(clickhouse),
            dead_letter_topic=settings.dead_letter_topic,
            project=args.project,
            reason=args.reason,
            dry_run=args.dry_run,
        )
    finally:
        await producer.stop()
    print(  # noqa: T201
        f"examined {result.examined}, selected {result.selected}, "
        f"already replayed {result.already}, "
        + (
            f"would replay {result.replayed} (dry run)"
            if args.dry_run
            else f"replayed {result.replayed}"
        )
    )
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    import json
    import os

    from services.cli.importer import LineError, Options, open_lines, reading, run_import

    key = args.key or os.environ.get("MANIAC_API_KEY")
    if not key:
        print("maniac import: no API key: set MANIAC_API_KEY or pass --key", file=sys.stderr)  # noqa: T201
        return 2
    try:
        source = open_lines(args.file, sys.stdin.buffer)
    except OSError as exc:
        print(f"maniac import: cannot read {args.file}: {exc.strerror}", file=sys.stderr)  # noqa: T201
        return 2
    options = Options(
        url=args.url,
        key=key,
        container=args.container,
        batch=args.batch,
        batch_bytes=args.batch_bytes,
        concurrency=args.concurrency,
        resume_from=args.resume_from,
        retry_for_s=args.retry_for,
    )
    with contextlib.ExitStack() as closing:
        if source is not sys.stdin.buffer:
            closing.enter_context(source)
        try:
            out = closing.enter_context(args.errors.open("w")) if args.errors else sys.stderr
        except OSError as exc:
            print(f"maniac import: cannot write {args.errors}: {exc.strerror}", file=sys.stderr)  # noqa: T201
            return 2

        def report(error: LineError) -> None:
            out.write(json.dumps(error.record()) + "\n")

        summary, failure = asyncio.run(run_import(source, options, report))
    print(json.dumps(summary.line()))  # noqa: T201
    if failure is not None:
        print(  # noqa: T201
            f"maniac import: {failure}; resume with --resume-from {summary.resume_from}",
            file=sys.stderr,
        )
        if reading():  # its input stalled: the interpreter's shutdown would wait for the read
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(2)
        return 2
    return 0 if summary.rejected == 0 and summary.bad_json == 0 else 1


def _bounded(low: int, high: int) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is not between {low} and {high}")
        return value

    return parse


def _import_parser(sub: Any) -> None:
    from services.cli import importer

    p = sub.add_parser(
        "import",
        help="register a JSONL file of completed examples through the API",
        description=(
            "Register a JSONL file of completed examples through POST "
            '/v1/chat/completions/register. Each line is a register item ({"input": ..., '
            '"output": ...}) or an OpenAI chat fine-tuning line ({"messages": [...]} ending '
            "with the assistant's message). Rejected items and lines that are not JSON objects "
            "are reported as JSON lines with their line number; a one-line JSON summary ends "
            "on stdout. Exit status: 0 all accepted, 1 some lines rejected, 2 stopped (a refused "
            "key, a server that does not answer, an unreadable file, an interruption)."
        ),
        epilog=(
            "Resuming: an import that stops says which line to resume from (every line before "
            "it was answered) and puts it in the summary as resume_from; run the same command "
            "again with --resume-from LINE. Lines sent twice are stored once: register is "
            "idempotent by the output's id, or by the item's content when it has none."
        ),
    )
    p.set_defaults(func=cmd_import)
    p.add_argument("file", help="JSONL file, or - for standard input")
    p.add_argument("--container", required=True, help="container label for every item")
    p.add_argument(
        "--url", default="http://127.0.0.1:8000", help="the gateway (default: %(default)s)"
    )
    p.add_argument("--key", default=None, help="API key (default: $MANIAC_API_KEY)")
    p.add_argument(
        "--batch",
        type=_bounded(1, importer.MAX_ITEMS_PER_REQUEST),
        default=importer.DEFAULT_BATCH,
        help=f"items per request (default: %(default)s, at most {importer.MAX_ITEMS_PER_REQUEST})",
    )
    p.add_argument(
        "--batch-bytes",
        dest="batch_bytes",
        type=_bounded(1024, importer.MAX_BODY_BYTES),
        default=importer.DEFAULT_BATCH_BYTES,
        help="most bytes per request (default: %(default)s)",
    )
    p.add_argument(
        "--concurrency",
        type=_bounded(1, 64),
        default=importer.DEFAULT_CONCURRENCY,
        help="requests at a time (default: %(default)s)",
    )
    p.add_argument(
        "--resume-from",
        dest="resume_from",
        type=_bounded(1, 2**63),
        default=1,
        metavar="LINE",
        help="skip the lines before LINE (numbered from 1)",
    )
    p.add_argument(
        "--errors",
        type=Path,
        default=None,
        metavar="FILE",
        help="write the rejected lines there as JSON lines (default: stderr)",
    )
    p.add_argument(
        "--retry-for",
        dest="retry_for",
        type=float,
        default=importer.DEFAULT_RETRY_FOR_S,
        metavar="SECONDS",
        help="how long a batch is retried after 429, 503, other 5xx and connection errors "
        "before the import stops (default: %(default)s)",
    )


def utc_time(text: str) -> datetime:
    """An ISO-8601 date or time; without an offset, it is UTC (not this machine's zone)."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO-8601 date or time: {text!r}") from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maniac", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    data = argparse.ArgumentParser(add_help=False)
    data.add_argument(
        "--data-dir", type=Path, default=None, dest="data_dir", help="default: ./.maniac"
    )
    http = argparse.ArgumentParser(add_help=False)
    http.add_argument("--host", default=None)
    http.add_argument("--port", type=int, default=None)

    def leaf(group: Any, name: str, help_: str, func: Any, *parents: Any) -> Any:
        p = group.add_parser(name, help=help_, parents=[data, *parents])
        p.set_defaults(func=func)
        return p

    def admin(action: str) -> Any:
        return lambda a: asyncio.run(_with_clickhouse(a, action))

    leaf(sub, "serve", "gateway, workers and query service in one process", cmd_serve, http)
    leaf(sub, "gateway", "the gateway (register, create)", cmd_gateway, http)
    leaf(sub, "query", "the query service (list, get)", cmd_query, http)
    leaf(sub, "worker", "a consumer worker (run several: one group)", cmd_worker)
    leaf(sub, "migrate", "apply ClickHouse migrations", admin("migrate"))

    reprice = leaf(
        sub, "reprice", "re-price stored completions at current prices", admin("reprice")
    )
    reprice.add_argument(
        "--from", dest="start", type=utc_time, required=True, help="ISO-8601, inclusive (UTC)"
    )
    reprice.add_argument(
        "--to", dest="end", type=utc_time, required=True, help="ISO-8601, exclusive (UTC)"
    )
    reprice.add_argument("--project", default=None)
    reprice.add_argument("--pricing-file", type=Path, default=None, dest="pricing_file")
    reprice.add_argument("--dry-run", action="store_true", dest="dry_run")

    rebuild = leaf(
        sub,
        "rebuild",
        "fill the list's index and the usage aggregates again from completions "
        "(stop the workers first)",
        admin("rebuild"),
    )
    rebuild.add_argument("--check", action="store_true", help="only compare them with completions")

    dlq = sub.add_parser("dlq", help="dead letters").add_subparsers(
        dest="dlq_command", required=True
    )
    dlq_list = leaf(dlq, "list", "the newest dead letters and whether replayed", admin("dlq_list"))
    dlq_list.add_argument("--project", default=None)
    dlq_list.add_argument("--limit", type=int, default=100)
    dlq_replay = leaf(
        dlq,
        "replay",
        "re-publish dead letters not replayed yet (needs MANIAC_KAFKA_BOOTSTRAP)",
        admin("dlq_replay"),
    )
    dlq_replay.add_argument("--project", default=None)
    dlq_replay.add_argument("--reason", default=None, help="substring of the reason")
    dlq_replay.add_argument("--dry-run", action="store_true", dest="dry_run")

    keys = sub.add_parser("keys", help="manage API keys").add_subparsers(
        dest="keys_command", required=True
    )
    create = leaf(keys, "create", "create a key for a project and print it once", admin("create"))
    create.add_argument("--project", required=True)
    leaf(keys, "list", "list key ids and their projects", admin("list"))
    revoke = leaf(keys, "revoke", "revoke a key by its id", admin("revoke"))
    revoke.add_argument("key_id")
    _import_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from clickhouse_connect.driver.exceptions import OperationalError

    from services.common.clickhouse import EngineInUse
    from services.common.logging import first_line
    from services.common.runtime import NotReady

    args = build_parser().parse_args(argv)
    try:
        result: int = args.func(args)
    except (EngineInUse, NotReady) as exc:
        print(exc, file=sys.stderr)  # noqa: T201
        return 2
    except OperationalError as exc:  # a server that does not answer: said, not a traceback
        print(f"ClickHouse cannot be reached: {first_line(exc)}", file=sys.stderr)  # noqa: T201
        return 2
    return result


if __name__ == "__main__":
    sys.exit(main())
