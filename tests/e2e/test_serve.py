"""`maniac serve` as a user runs it: one process, embedded broker and ClickHouse."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog

from schemas.events import COMPLETIONS_TOPIC
from services import stack as stack_module
from services.common.clickhouse import ClickHouse
from services.common.kafka import EmbeddedBroker, create_consumer, create_producer
from services.common.settings import ServeSettings
from services.stack import Stack
from services.worker.runner import Worker
from tests.conftest import Broker, eventually, unique
from tests.e2e.conftest import StackFactory
from tests.support.serve import MANIAC, Serve, start_serve
from tests.support.worker import event

HOLDING = {"MANIAC_BATCH_MAX_ROWS": "1000000", "MANIAC_BATCH_MAX_MS": "3600000"}
"""The worker holds every record in its batch: acknowledged items exist only in the broker."""


async def _register(url: str, key: str, n: int, batch: int = 100, first: int = 0) -> None:
    """Register ids ``id-<first>`` .. ``id-<first + n - 1>``, ``batch`` per request."""
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}) as c:
        for start in range(first, first + n, batch):
            items: list[dict[str, Any]] = [
                {
                    "input": {"messages": [{"role": "user", "content": f"q{i}"}]},
                    "output": {"id": f"id-{i}", "choices": [], "created": 1_700_000_000 + i},
                }
                for i in range(start, min(start + batch, first + n))
            ]
            response = await c.post(
                "/v1/chat/completions/register", json={"container": "c", "items": items}
            )
            assert response.json()["summary"]["accepted"] == len(items)


async def _total(url: str, key: str) -> int:
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}) as c:
        response = await c.get("/v1/chat/completions", params={"limit": 1})
        assert response.status_code == 200, response.text
        return int(response.json()["total"])


async def test_topics_it_creates_have_one_partition_and_every_item_is_stored(
    start_stack: StackFactory,
) -> None:
    topic = unique("completions")
    running = await start_stack(topic=topic, dead_letter_topic=f"{topic}.dlq")
    assert running.stack.gateway is not None
    producer = running.stack.gateway.producer
    assert await producer.partitions_for(topic) == {0}
    assert await producer.partitions_for(f"{topic}.dlq") == {0}
    await _register(running.base_url, "key-a", 250, batch=100)
    await eventually(lambda: _is_total(running.base_url, "key-a", 250))


async def test_sigterm_drains_everything_acknowledged_and_it_survives_restart(
    tmp_path: Path, env: dict[str, str], servers: list[Serve]
) -> None:
    env = {**env, "MANIAC_API_KEYS": "projA:key-a"}
    first = await start_serve(servers, tmp_path / "data", env)
    await _register(first.url, "key-a", 1000)
    # stop at once: nothing has been waited for, the drain must store all 1000
    assert first.stop() == 0
    assert '"drained"' in first.output()

    second = await start_serve(servers, tmp_path / "data", env)
    assert await _total(second.url, "key-a") == 1000
    assert second.stop(signal.SIGINT) == 0


async def test_without_keys_a_dev_key_is_created_and_printed(
    tmp_path: Path, env: dict[str, str], servers: list[Serve]
) -> None:
    env.pop("MANIAC_API_KEYS", None)
    server = await start_serve(servers, tmp_path / "data", env)
    match = re.search(r"\b(mk-[A-Za-z0-9_\-]{40,})", server.output())
    assert match, server.output()
    key = match.group(1)
    await _register(server.url, key, 3)
    await eventually(lambda: _is_total(server.url, key, 3))
    assert server.stop() == 0


def test_a_port_in_use_is_refused_before_anything_starts(
    tmp_path: Path, env: dict[str, str], servers: list[Serve]
) -> None:
    env.pop("MANIAC_API_KEYS", None)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = Serve(tmp_path / "data", env)
        server.port = taken.getsockname()[1]
        servers.append(server)
        server.start()
        assert server.proc.wait(timeout=30) == 2
    output = server.output()
    assert f"cannot listen on 127.0.0.1:{server.port}" in output
    assert "MANIAC_PORT" in output
    # nothing started: no broker, no database, and no development key printed and lost
    assert "broker_started" not in output
    assert "mk-" not in output
    assert not (tmp_path / "data" / "clickhouse").exists()


async def _is_total(url: str, key: str, n: int) -> bool:
    return await _total(url, key) == n


async def test_a_second_process_on_a_data_dir_in_use_is_told_which_holds_it(
    tmp_path: Path, env: dict[str, str], servers: list[Serve]
) -> None:
    env = {**env, "MANIAC_API_KEYS": "projA:key-a"}
    server = await start_serve(servers, tmp_path / "data", env)
    in_use = f"is open in another process (pid {server.proc.pid})"

    refused = _maniac(tmp_path / "data", env, "keys", "list", code=2)
    assert in_use in refused
    assert "Traceback" not in refused

    second = Serve(tmp_path / "data", env)
    servers.append(second)
    second.start()
    assert second.proc.wait(timeout=30) == 2
    assert in_use in second.output()
    assert "broker_started" not in second.output()  # refused before starting anything

    await _register(server.url, "key-a", 3)  # the first one is untouched
    await eventually(lambda: _is_total(server.url, "key-a", 3))
    assert server.stop() == 0
    # released when its holder exits
    assert "applied migrations: none" in _maniac(tmp_path / "data", env, "migrate")


def _maniac(data_dir: Path, env: dict[str, str], *args: str, code: int = 0) -> str:
    """Run a `maniac` command on ``data_dir``; its stdout and stderr, its exit code checked."""
    result = subprocess.run(
        [MANIAC, *args, "--data-dir", str(data_dir)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == code, result.stderr
    return result.stdout + result.stderr


def test_keys_cli_creates_lists_and_revokes(tmp_path: Path, env: dict[str, str]) -> None:
    def maniac(*args: str, code: int = 0) -> str:
        return _maniac(tmp_path, env, *args, code=code)

    # an operator's command never migrates (a deploy may be migrating): it says what to run
    refused = maniac("keys", "create", "--project", "projX", code=2)
    assert "lacks migrations (0001_completions, " in refused
    assert "run `maniac migrate` first" in refused
    assert "applied migrations: [1, 2, 3" in maniac("migrate")  # nothing was applied before
    key = maniac("keys", "create", "--project", "projX").strip()
    assert key.startswith("mk-")
    listed = maniac("keys", "list")
    assert "projX" in listed
    assert key not in listed
    key_id = listed.split()[0]
    assert "revoked 1" in maniac("keys", "revoke", key_id)
    assert "projX" not in maniac("keys", "list")
    # a project a key could not be filed under: its records' keys are `project/id`
    for project in ("", "a/b", "has space"):
        assert "invalid project" in maniac("keys", "create", "--project", project, code=2)
    assert "projX" not in maniac("keys", "list")


def test_reprice_cli_refuses_bad_ranges_and_prints_plain_decimals(
    tmp_path: Path, env: dict[str, str]
) -> None:
    def maniac(*args: str, code: int = 0) -> str:
        return _maniac(tmp_path, env, *args, code=code)

    maniac("migrate")
    refused = maniac("reprice", "--from", "2025-13-01", "--to", "2025-07-01", code=2)
    assert "not an ISO-8601 date or time: '2025-13-01'" in refused
    backwards = maniac("reprice", "--from", "2025-07-01", "--to", "2025-06-01", code=2)
    assert "--from must be before --to" in backwards
    dry = maniac("reprice", "--from", "2025-06-01", "--to", "2025-07-01", "--dry-run")
    assert "examined 0, re-priced 0, spend changed by 0 (dry run)" in dry


_LOSE_HALF_THE_LISTING = """
import asyncio, sys
from services.common.clickhouse import ClickHouse, ClickHouseTarget
from pathlib import Path

async def main() -> None:
    ch = ClickHouse.connect(ClickHouseTarget.embedded(Path(sys.argv[1])))
    await ch.command("DELETE FROM {database}.completion_listing WHERE completion_id < 'id-18'")
    ch.close()

asyncio.run(main())
"""


async def test_rebuild_cli_finds_and_fills_again_what_the_list_lost(
    tmp_path: Path, env: dict[str, str], servers: list[Serve]
) -> None:
    data = tmp_path / "data"
    env = {**env, "MANIAC_API_KEYS": "projA:key-a"}
    server = await start_serve(servers, data, env)
    await _register(server.url, "key-a", 20, batch=10)
    await eventually(lambda: _is_total(server.url, "key-a", 20), timeout_s=60)
    assert server.stop() == 0
    assert "completion_listing: 20 of 20 completions\n" in _maniac(data, env, "rebuild", "--check")

    # rows lost from the list's index (ClickHouse detaching a broken part of it, say)
    script = [sys.executable, "-c", _LOSE_HALF_THE_LISTING, str(data)]
    subprocess.run(script, env=env, check=True, capture_output=True)
    lost = _maniac(data, env, "rebuild", "--check", code=1)
    assert "completion_listing: 10 of 20 completions, 10 groups differ  (differs" in lost
    assert "usage_hourly: 20 of 20 completions\n" in lost

    assert "completion_listing: 20 of 20 completions\n" in _maniac(data, env, "rebuild")
    again = await start_serve(servers, data, env)
    async with httpx.AsyncClient(
        base_url=again.url, headers={"Authorization": "Bearer key-a"}
    ) as c:
        page = (await c.get("/v1/chat/completions", params={"limit": 100})).json()
    assert sorted(r["id"] for r in page["data"]) == sorted(f"id-{i}" for i in range(20))
    assert again.stop() == 0


def test_an_admin_command_on_a_clickhouse_that_does_not_answer_says_so(
    tmp_path: Path, env: dict[str, str]
) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        away = {**env, "MANIAC_CLICKHOUSE_URL": f"http://127.0.0.1:{sock.getsockname()[1]}/m"}
    refused = _maniac(tmp_path, away, "keys", "list", code=2)
    assert "ClickHouse cannot be reached:" in refused
    assert "Traceback" not in refused


def test_a_dlq_replay_on_a_kafka_that_does_not_answer_says_so(
    tmp_path: Path, env: dict[str, str]
) -> None:
    _maniac(tmp_path, env, "migrate")
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        away = {**env, "MANIAC_KAFKA_BOOTSTRAP": f"127.0.0.1:{sock.getsockname()[1]}"}
    refused = _maniac(tmp_path, away, "dlq", "replay", "--dry-run", code=2)
    assert "Kafka cannot be reached at 127.0.0.1:" in refused
    assert "Traceback" not in refused
    assert "Unclosed" not in refused


async def test_kill_9_does_not_leave_the_embedded_broker_behind(
    tmp_path: Path, env: dict[str, str], servers: list[Serve]
) -> None:
    server = await start_serve(servers, tmp_path / "data", {**env, "MANIAC_API_KEYS": "p:k"})
    match = re.search(r'"bootstrap": "127\.0\.0\.1:(\d+)"', server.output())
    assert match, server.output()
    broker_port = int(match.group(1))
    assert server.stop(signal.SIGKILL) == -signal.SIGKILL

    async def broker_gone() -> bool:
        try:
            socket.create_connection(("127.0.0.1", broker_port), timeout=0.2).close()
        except OSError:
            return True
        return False

    await eventually(broker_gone, timeout_s=10)


async def _get(url: str, key: str, path: str, **params: Any) -> Any:
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}) as c:
        response = await c.get(path, params=params)
        assert response.status_code == 200, response.text
        return response.json()


async def test_a_memory_broker_past_its_limit_starts_afresh_and_nothing_is_lost(
    tmp_path: Path, env: dict[str, str], servers: list[Serve]
) -> None:
    # 1 MB: the embedded broker is always past it, so it is started again every second or so
    env = {**env, "MANIAC_API_KEYS": "projA:key-a", "MANIAC_BROKER_MAX_MEMORY_MB": "1"}
    server = await start_serve(servers, tmp_path / "data", env)
    match = re.search(r'"bootstrap": "(127\.0\.0\.1:\d+)"', server.output())
    assert match, server.output()
    producer = create_producer(match.group(1), linger_ms=0)
    await producer.start()
    try:  # a message the worker refuses, produced by someone else: a dead letter
        await (await producer.send("maniac.completions.v1", key=b"projA/bad", value=b"{nope"))
    finally:
        await producer.stop()

    async def dead_letters(n: int) -> bool:
        status = await _get(server.url, "key-a", "/v1/status")
        return bool(status["dead_lettered"]["total"] == n)

    await eventually(lambda: dead_letters(1))
    for round_ in range(40):  # about six seconds of registering, across several restarts
        await _register(server.url, "key-a", 100, batch=100, first=round_ * 100)
        await asyncio.sleep(0.1)
    await eventually(lambda: _is_total(server.url, "key-a", 4000), timeout_s=60)
    restarts = server.output().count('"broker_restarted"')
    assert restarts >= 2, server.output()
    assert "Unable connect" not in server.output()  # a planned restart is no error

    # the dead letter came through every restart: it is replayed (and, still invalid, it is
    # dead-lettered again, as another dead letter, though its offset may be the same)
    async with httpx.AsyncClient(
        base_url=server.url, headers={"Authorization": "Bearer key-a"}
    ) as c:
        replayed = (await c.post("/v1/dead_letters/replay")).json()
    assert (replayed["selected"], replayed["replayed"]) == (1, 1), replayed
    await eventually(lambda: dead_letters(2))
    assert await _total(server.url, "key-a") == 4000
    assert server.stop() == 0


def _broker_pid(server: Serve) -> int:
    """The pid of `maniac serve`'s embedded broker (its child named tansu)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            comm = (entry / "comm").read_text().strip()
        except OSError:
            continue
        if comm == "tansu" and int(stat.rsplit(")", 1)[1].split()[1]) == server.proc.pid:
            return int(entry.name)
    raise AssertionError("no embedded broker under maniac serve")


async def test_an_embedded_broker_that_dies_is_started_again(
    tmp_path: Path, env: dict[str, str], servers: list[Serve]
) -> None:
    # the worker holds what it fetched in its batch: acknowledged, not stored yet (and the
    # drain at the end gives up at once)
    env = {**env, **HOLDING, "MANIAC_API_KEYS": "projA:key-a", "MANIAC_DRAIN_TIMEOUT_S": "1"}
    server = await start_serve(servers, tmp_path / "data", env)
    await _register(server.url, "key-a", 100)
    first = _broker_pid(server)

    async def fetched() -> bool:  # the lag is set after each fetch: 100 fetched, 0 stored
        async with httpx.AsyncClient() as client:
            metrics = (await client.get(f"{server.url}/metrics")).text
        return bool(re.search(r"^maniac_worker_consumer_lag\{[^}]*\} 100\.0$", metrics, re.M))

    await eventually(fetched)
    os.kill(first, signal.SIGKILL)

    async def registers_again() -> bool:
        try:
            await _register(server.url, "key-a", 100, first=100)
        except (AssertionError, httpx.HTTPError):
            return False
        return True

    await eventually(registers_again, timeout_s=60, interval_s=0.5)
    # what the worker had fetched was stored as it stopped
    assert await _total(server.url, "key-a") == 100
    assert _broker_pid(server) != first

    async def logged() -> bool:
        return '"broker_revived"' in server.output()

    await eventually(logged)
    assert '"lost": 0' in server.output()  # the worker stored what it had fetched
    async with httpx.AsyncClient() as client:
        assert (await client.get(f"{server.url}/readyz")).status_code == 200
    assert server.stop() == 0


async def test_a_broker_that_dies_under_load_is_replaced_without_waiting_on_a_commit(
    tmp_path: Path, env: dict[str, str], servers: list[Serve]
) -> None:
    """A commit in flight when the broker dies waits for it to come back; the worker being
    replaced must not wait for it (it held publishing for its whole 10 s bound)."""
    # the default session timeout, which bounds how long aiokafka's commit waits
    env = {k: v for k, v in env.items() if "SESSION" not in k and "HEARTBEAT" not in k}
    env["MANIAC_API_KEYS"] = "projA:key-a"
    server = await start_serve(servers, tmp_path / "data", env)
    registered = 0

    async def load() -> None:  # batches stored and committed all the time
        nonlocal registered
        while True:
            with contextlib.suppress(AssertionError, KeyError, httpx.HTTPError):  # 503s
                await _register(server.url, "key-a", 100, batch=100, first=registered)
                registered += 100

    loading = asyncio.create_task(load())
    try:
        await eventually(lambda: _is_registered(registered, 3000), timeout_s=60)
        broker = _broker_pid(server)
        os.kill(broker, signal.SIGSTOP)  # the batches stored meanwhile wait on their commits
        await asyncio.sleep(1.0)
        os.kill(broker, signal.SIGKILL)

        async def revived() -> bool:
            return '"broker_revived"' in server.output()

        await eventually(revived, timeout_s=30)
        after = registered
        await eventually(lambda: _is_registered(registered, after + 500), timeout_s=30)
    finally:
        loading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loading
    assert "worker_detach_timed_out" not in server.output()
    assert server.stop() == 0


async def _is_registered(registered: int, at_least: int) -> bool:
    return registered >= at_least


@pytest.fixture
def own_broker() -> Iterator[EmbeddedBroker]:
    """A broker for one stack's own (requested before the stack: stopped after it)."""
    own = EmbeddedBroker()
    own.start()
    yield own
    own.stop()


async def test_a_broker_restart_waits_until_everything_acknowledged_is_stored(
    own_broker: EmbeddedBroker,
    start_stack: StackFactory,
    clickhouse: ClickHouse,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(stack_module, "RESTART_DRAIN_S", 1.0)
    running = await start_stack(  # restarted by hand here: no watcher
        bootstrap=own_broker.bootstrap,
        own=own_broker,
        broker_max_memory_mb=0,
        insert_retry_max_s=0.2,
    )
    stack, url = running.stack, running.base_url
    await _register(url, "key-a", 50)
    await eventually(lambda: _is_total(url, "key-a", 50))

    # ClickHouse refuses the worker's inserts: what is acknowledged now is only in the broker
    await clickhouse.command("RENAME TABLE {database}.completions TO {database}.away")
    await _register(url, "key-a", 10, first=50)
    assert await stack.restart_broker(reason="test") is False  # kept: nothing lost
    await _register(url, "key-a", 10, first=60)  # and publishing goes on
    await clickhouse.command("RENAME TABLE {database}.away TO {database}.completions")
    await eventually(lambda: _is_total(url, "key-a", 70))

    assert await stack.restart_broker(reason="test") is True
    assert stack.publisher is not None
    assert stack.publisher.acked == {}  # a new log, from offset 0
    await _register(url, "key-a", 10, first=70)
    assert list(stack.publisher.acked.values()) == [9]
    await eventually(lambda: _is_total(url, "key-a", 80))


async def test_registers_wait_while_the_records_not_yet_stored_hold_more_than_the_byte_limit(
    own_broker: EmbeddedBroker, start_stack: StackFactory, clickhouse: ClickHouse
) -> None:
    running = await start_stack(
        bootstrap=own_broker.bootstrap,
        own=own_broker,
        broker_max_memory_mb=0,
        insert_retry_max_s=0.2,
        max_backlog_bytes=200_000,
        publish_timeout_s=1.0,
    )
    stack, url = running.stack, running.base_url
    headers = {"Authorization": "Bearer key-a"}

    def items(first: int) -> list[dict[str, Any]]:  # 5 items of about 50 KB
        return [
            {
                "input": {"messages": [{"role": "user", "content": "x" * 50_000}]},
                "output": {"id": f"big-{i}", "choices": [], "created": 1_700_000_000},
            }
            for i in range(first, first + 5)
        ]

    # ClickHouse refuses the worker's inserts: what is acknowledged stays in the broker
    await clickhouse.command("RENAME TABLE {database}.completions TO {database}.away")
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as client:
        register = "/v1/chat/completions/register"
        first = await client.post(register, json={"container": "c", "items": items(0)})
        assert first.json()["summary"]["accepted"] == 5  # the backlog was empty
        assert stack.pending_bytes() > 250_000  # 5 records of 50 KB, not stored
        assert stack.pending() == 5  # far under the record limit (10,000)

        held = await client.post(register, json={"container": "c", "items": items(5)})
        assert held.status_code == 503
        assert held.json()["error"]["details"] == {"reason": "backlog"}
        assert held.headers["Retry-After"] == "1"

        await clickhouse.command("RENAME TABLE {database}.away TO {database}.completions")
        await eventually(lambda: _is_total(url, "key-a", 5))
        assert stack.pending_bytes() == 0
        again = await client.post(register, json={"container": "c", "items": items(5)})
        assert again.json()["summary"]["accepted"] == 5
    await eventually(lambda: _is_total(url, "key-a", 10))


async def test_a_broker_restart_that_fails_after_the_broker_restarted_leaves_no_stale_backlog(
    own_broker: EmbeddedBroker, start_stack: StackFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    running = await start_stack(
        bootstrap=own_broker.bootstrap, own=own_broker, broker_max_memory_mb=0
    )
    stack, url = running.stack, running.base_url
    await _register(url, "key-a", 50)
    await eventually(lambda: _is_total(url, "key-a", 50))

    from services.common.runtime import prepare_topics

    async def fails_once_done(*args: Any, **kwargs: Any) -> None:
        await prepare_topics(*args, **kwargs)
        monkeypatch.setattr(stack_module, "prepare_topics", prepare_topics)
        raise ConnectionError("lost on the way back")

    monkeypatch.setattr(stack_module, "prepare_topics", fails_once_done)
    with pytest.raises(ConnectionError):
        await stack.restart_broker(reason="test")
    # the broker did restart, empty: offsets of its old log no longer count as a backlog
    assert stack.publisher is not None
    assert stack.publisher.acked == {}
    assert stack.pending() == 0
    await _register(url, "key-a", 10, first=50)  # accepted, not held behind a backlog
    await eventually(lambda: _is_total(url, "key-a", 60))


async def test_dead_letters_written_back_count_beyond_the_broker_memory_limit(
    own_broker: EmbeddedBroker, start_stack: StackFactory
) -> None:
    running = await start_stack(  # restarted by hand here: no restart on memory
        bootstrap=own_broker.bootstrap, own=own_broker, broker_max_memory_mb=0
    )
    stack, url = running.stack, running.base_url
    producer = create_producer(own_broker.bootstrap, linger_ms=0)
    await producer.start()
    try:  # records of megabytes the worker refuses, produced by someone else: dead letters
        for i in range(2):
            value = b"\xff" + os.urandom(20 * 1024 * 1024)
            await producer.send_and_wait(stack.settings.topic, key=b"projA/big%d" % i, value=value)
    finally:
        await producer.stop()

    async def dead_letters() -> bool:
        status = await _get(url, "key-a", "/v1/status")
        return bool(status["dead_lettered"]["total"] == 2)

    await eventually(dead_letters)
    assert await stack.restart_broker(reason="test") is True  # the dead letters written back
    used = own_broker.memory_bytes()
    assert used is not None
    taken = stack.dead_letter_bytes  # measured as they were written back
    assert taken > 30 * 2**20  # 40 MB of dead letters
    # a limit the broker passes with the dead letters alone (what it holds without them is
    # its own: 15-34 MB): started afresh, it would hold them again at once
    limit_mb = (used - taken // 2) // 2**20
    stack.settings = stack.settings.model_copy(update={"broker_max_memory_mb": limit_mb})
    assert used > limit_mb * 2**20
    assert not stack.memory_restart_due(used)
    assert stack.memory_restart_due(limit_mb * 2**20 + taken + 2**20)  # more: given back


async def test_s3_broker_storage_keeps_acknowledged_items_through_kill_9(
    tmp_path: Path, env: dict[str, str], servers: list[Serve], s3_env: dict[str, str]
) -> None:
    env = {**env, **s3_env, "MANIAC_API_KEYS": "projA:key-a"}
    first = await start_serve(servers, tmp_path / "data", {**env, **HOLDING})
    await _register(first.url, "key-a", 50, batch=10)
    assert await _total(first.url, "key-a") == 0
    assert first.stop(signal.SIGKILL) == -signal.SIGKILL  # broker and worker die with it

    second = await start_serve(servers, tmp_path / "data", env)
    await eventually(lambda: _is_total(second.url, "key-a", 50), timeout_s=60)
    assert second.stop() == 0


async def test_s3_broker_storage_keeps_what_was_acknowledged_across_restarts(
    tmp_path: Path, env: dict[str, str], servers: list[Serve], s3_env: dict[str, str]
) -> None:
    env = {**env, **s3_env, "MANIAC_API_KEYS": "projA:key-a"}
    first = await start_serve(servers, tmp_path / "data", env)
    await _register(first.url, "key-a", 50, batch=10)
    assert first.stop() == 0  # drained: all 50 stored, the group's offset committed at 50

    # acknowledged after a restart, never stored: they exist only in the broker's S3 storage
    second = await start_serve(servers, tmp_path / "data", {**env, **HOLDING})
    await _register(second.url, "key-a", 10, batch=10, first=50)
    assert second.stop(signal.SIGKILL) == -signal.SIGKILL

    # at once, before the worker has fetched: the new records must follow the held ones, not
    # be numbered from 0 over them, and the worker resumes at offset 50
    third = await start_serve(servers, tmp_path / "data", env)
    await _register(third.url, "key-a", 100, batch=100, first=60)
    await eventually(lambda: _is_total(third.url, "key-a", 160), timeout_s=60)
    assert '"broker_watermarks_loaded"' in third.output()
    assert third.stop() == 0


_CLUSTER = Path("tansu", "clusters", "tansu_cluster")


def _watermark_of(topic: str) -> Path:
    """The S3 key of the high watermark of a topic's partition 0."""
    return _CLUSTER / "topics" / topic / "partitions" / "0000000000" / "watermark.json"


_WATERMARK = _watermark_of(COMPLETIONS_TOPIC)
_OFFSETS = (
    _CLUSTER
    / "groups"
    / "consumers"
    / "maniac-workers"
    / "offsets"
    / COMPLETIONS_TOPIC
    / "partitions"
    / "0000000000.json"
)


async def _fifty_stored_on_s3(
    tmp_path: Path, env: dict[str, str], servers: list[Serve]
) -> tuple[Serve, Path]:
    """`maniac serve` on S3 storage with 50 items stored and committed; where s3rver keeps the
    group's offsets."""
    server = await start_serve(servers, tmp_path / "data", env)
    await _register(server.url, "key-a", 50, batch=10)
    await eventually(lambda: _is_total(server.url, "key-a", 50), timeout_s=60)
    offsets = _s3_object(tmp_path / "s3", _OFFSETS)
    await eventually(lambda: _is_offset(offsets, 50), timeout_s=30)
    return server, offsets


def _s3_object(s3: Path, key: Path) -> Path:
    """Where s3rver keeps an object's bytes."""
    return s3 / key.parent / f"{key.name}._S3rver_object"


def _set_back(watermark: Path, behind: int) -> None:
    """A partition's high watermark (where s3rver keeps it) set back to ``behind``, and the
    batches from there on gone: what the broker kept is less than it acknowledged. (With the
    batches still stored, the watermark is moved up to them before the broker starts.)"""
    watermark.write_text(f'{{"low":null,"high":{behind},"timestamps":null}}')
    for stored in (watermark.parent / "records").glob("*.batch._S3rver_*"):
        if int(stored.name.partition(".")[0]) >= behind:
            stored.unlink()


async def test_an_s3_broker_that_crashed_mid_write_is_resumed_where_it_numbers_records(
    tmp_path: Path, env: dict[str, str], servers: list[Serve], s3_env: dict[str, str]
) -> None:
    """What a broker killed in the middle of its S3 writes leaves behind, as measured: s3rver
    truncates an object it is sent again before the new one has arrived, so the group's
    offsets object was left empty (Tansu then fails every OffsetFetch), and the partition's
    high watermark came back far behind what had been stored (Tansu numbered new records from
    there, behind the worker's committed offset). Both made here by hand while the broker is
    stopped, then it is killed."""
    env = {**env, **s3_env, "MANIAC_API_KEYS": "projA:key-a"}
    server, offsets = await _fifty_stored_on_s3(tmp_path, env, servers)

    broker = _broker_pid(server)
    os.kill(broker, signal.SIGSTOP)  # it writes nothing more while its objects are changed
    _set_back(_s3_object(tmp_path / "s3", _WATERMARK), 20)
    offsets.write_bytes(b"")
    os.kill(broker, signal.SIGKILL)

    async def revived() -> bool:
        return '"broker_revived"' in server.output()

    await eventually(revived, timeout_s=60)
    # numbered from 20 by the revived broker, over what was stored: stored all the same
    await eventually(lambda: _registers(server.url, 30, first=50), timeout_s=60, interval_s=0.5)
    await eventually(lambda: _is_total(server.url, "key-a", 80), timeout_s=60)
    revival = next(line for line in server.output().splitlines() if "broker_revived" in line)
    assert '"lost": 0' in revival
    assert '"resumed_at": {"0": 20}' in revival
    assert server.stop() == 0

    # the offsets object cut short across a restart: read from the beginning, nothing twice
    offsets.write_bytes(b"")
    again = await start_serve(servers, tmp_path / "data", env)
    await _register(again.url, "key-a", 10, batch=10, first=80)
    await eventually(lambda: _is_total(again.url, "key-a", 90), timeout_s=90)
    assert '"committed_offset_unreadable"' in again.output()
    assert again.stop() == 0


async def test_an_s3_broker_that_comes_back_behind_twice_in_a_row_is_resumed_both_times(
    tmp_path: Path, env: dict[str, str], servers: list[Serve], s3_env: dict[str, str]
) -> None:
    """The second time before the worker fetched anything: where it was positioned counts."""
    env = {**env, **s3_env, "MANIAC_API_KEYS": "projA:key-a"}
    server, offsets = await _fifty_stored_on_s3(tmp_path, env, servers)

    for times, behind in enumerate((20, 10), start=1):
        broker = _broker_pid(server)
        os.kill(broker, signal.SIGSTOP)
        watermark = _s3_object(tmp_path / "s3", _WATERMARK)
        _set_back(watermark, behind)
        os.kill(broker, signal.SIGKILL)
        revived = functools.partial(_logged, server, "broker_revived", times)
        await eventually(revived, timeout_s=60)
        await eventually(functools.partial(_is_offset, offsets, behind), timeout_s=30)

    await eventually(lambda: _registers(server.url, 30, first=50), timeout_s=60, interval_s=0.5)
    await eventually(lambda: _is_total(server.url, "key-a", 80), timeout_s=60)
    assert '"resumed_at": {"0": 10}' in server.output()
    assert server.stop() == 0


async def test_an_s3_broker_left_behind_by_a_kill_9_of_serve_is_resumed_where_it_numbers_records(
    tmp_path: Path, env: dict[str, str], servers: list[Serve], s3_env: dict[str, str]
) -> None:
    """As above, `maniac serve` itself killed with its broker: the next start finds the
    partition's high watermark (20) behind the group's committed offset (50). The worker
    starts at the high watermark, where the broker numbers the next records; records 20-49
    the broker no longer has were stored before they were committed: none is lost."""
    env = {**env, **s3_env, "MANIAC_API_KEYS": "projA:key-a"}
    first, offsets = await _fifty_stored_on_s3(tmp_path, env, servers)

    broker = _broker_pid(first)
    os.kill(broker, signal.SIGSTOP)
    _set_back(_s3_object(tmp_path / "s3", _WATERMARK), 20)
    assert first.stop(signal.SIGKILL) == -signal.SIGKILL
    os.kill(broker, signal.SIGKILL)  # stopped, it would not act on its parent's death
    await eventually(lambda: _gone(broker))

    second = await start_serve(servers, tmp_path / "data", env)
    await _register(second.url, "key-a", 30, batch=30, first=50)  # numbered 20-49
    await eventually(lambda: _is_total(second.url, "key-a", 80), timeout_s=60)
    await eventually(functools.partial(_is_offset, offsets, 50), timeout_s=30)
    [line] = [
        line for line in second.output().splitlines() if '"committed_past_high_watermark"' in line
    ]
    assert '"resumed_at": {"0": 20}' in line
    assert '"stored_not_kept": 30' in line
    assert second.stop() == 0


async def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"


@pytest.fixture
def own_s3_broker(
    s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> Iterator[EmbeddedBroker]:
    """A broker for one stack's own on S3 storage (requested before the stack: stopped after
    it)."""
    for name, value in s3_env.items():
        monkeypatch.setenv(name, value)
    own = EmbeddedBroker(storage=s3_env["MANIAC_BROKER_STORAGE"])
    own.start()
    yield own
    own.stop()


async def test_an_s3_broker_that_dies_again_before_the_revived_worker_is_positioned(
    own_s3_broker: EmbeddedBroker,
    start_stack: StackFactory,
    settings: ServeSettings,
    tmp_path: Path,
) -> None:
    """A revival starts the worker where the broker came back behind (20), and the broker dies
    again, behind again (10), before that worker got there: frozen before it could answer the
    worker anything. The next revival still starts its worker where storing reached, not at
    the group's offset (20), past where the broker numbers the next records."""
    stack, url, watermark = await _fifty_stored_on_own_s3(
        own_s3_broker, start_stack, settings, tmp_path
    )
    positioning = await _revived_behind(stack, own_s3_broker, watermark, 20)
    os.kill(_pid(own_s3_broker), signal.SIGSTOP)  # before its worker is positioned
    _set_back(watermark, 10)
    with structlog.testing.capture_logs() as logged:
        os.kill(_pid(own_s3_broker), signal.SIGKILL)
        await eventually(lambda: _replaced(stack, positioning), timeout_s=60)
    [revival] = [e for e in logged if e["event"] == "broker_revived"]
    assert revival["resumed_at"] == {0: 10}

    # numbered from 10 by the broker: stored all the same
    await eventually(lambda: _registers(url, 30, first=50), timeout_s=60, interval_s=0.5)
    await eventually(lambda: _is_total(url, "key-a", 80), timeout_s=60)


async def test_an_s3_broker_that_dies_as_the_revived_worker_commits_its_start(
    own_s3_broker: EmbeddedBroker,
    start_stack: StackFactory,
    settings: ServeSettings,
    tmp_path: Path,
) -> None:
    """As above, the broker dying while the revived worker's commit of where it starts is
    under way: the broker answers it once written to S3, which does not answer here. That
    worker is detached at once (the revival waited 10 s on its commit, holding publishing),
    and the next one starts where storing reached."""
    stack, url, watermark = await _fifty_stored_on_own_s3(
        own_s3_broker, start_stack, settings, tmp_path
    )
    positioning = await _revived_behind(stack, own_s3_broker, watermark, 20)
    s3rver = _s3rver_pid(tmp_path / "s3")
    os.kill(s3rver, signal.SIGSTOP)
    try:
        await asyncio.sleep(0.5)  # its commit waits on S3
        with structlog.testing.capture_logs() as logged:
            os.kill(_pid(own_s3_broker), signal.SIGKILL)
            _set_back(watermark, 10)
            os.kill(s3rver, signal.SIGCONT)
            await eventually(lambda: _replaced(stack, positioning), timeout_s=60)
    finally:
        os.kill(s3rver, signal.SIGCONT)
    assert "worker_detach_timed_out" not in [e["event"] for e in logged]
    [revival] = [e for e in logged if e["event"] == "broker_revived"]
    assert revival["resumed_at"] == {0: 10}

    await eventually(lambda: _registers(url, 30, first=50), timeout_s=60, interval_s=0.5)
    await eventually(lambda: _is_total(url, "key-a", 80), timeout_s=60)


async def test_an_s3_broker_revived_behind_the_batches_it_stored_loses_none_of_them(
    own_s3_broker: EmbeddedBroker,
    start_stack: StackFactory,
    settings: ServeSettings,
    tmp_path: Path,
) -> None:
    """Killed after writing batches and before their watermark (set back to 20 here, the
    batches 20-49 still stored): the revived broker numbered new records from 20 in batches
    of other sizes, batches of the earlier life stayed among them, and the worker read those
    again and skipped new ones. The watermark is moved up to the batches stored first."""
    stack, url, watermark = await _fifty_stored_on_own_s3(
        own_s3_broker, start_stack, settings, tmp_path
    )
    with structlog.testing.capture_logs() as logged:
        await _revived_behind(stack, own_s3_broker, watermark, 20, keep_batches=True)
        for first in range(50, 85, 7):  # batches of 7 over the stored batches of 10
            registers = functools.partial(_registers, url, 7, first=first)
            await eventually(registers, timeout_s=60, interval_s=0.5)
        await eventually(lambda: _is_total(url, "key-a", 85), timeout_s=60)
    [repaired] = [e for e in logged if e["event"] == "broker_storage_repaired"]
    assert (repaired["watermark_was"], repaired["watermark"]) == (20, 50)


async def test_an_s3_broker_on_an_empty_batch_under_its_watermark_reads_on_past_it(
    tmp_path: Path, env: dict[str, str], servers: list[Serve], s3_env: dict[str, str]
) -> None:
    """An S3 write cut short by a crash left a batch the watermark covers empty, among
    records acknowledged and not yet stored: Tansu failed every fetch that reached it, and
    the worker never got past it (all pending for good, across restarts). The empty object
    is deleted before the broker starts: its 10 records are gone, the rest is stored."""
    env = {**env, **s3_env, "MANIAC_API_KEYS": "projA:key-a"}
    first = await start_serve(servers, tmp_path / "data", env)
    await _register(first.url, "key-a", 50, batch=10)
    assert first.stop() == 0  # all 50 stored, the group's offset committed at 50

    second = await start_serve(servers, tmp_path / "data", {**env, **HOLDING})
    await _register(second.url, "key-a", 30, batch=10, first=50)  # acknowledged, not stored
    assert second.stop(signal.SIGKILL) == -signal.SIGKILL
    records = _s3_object(tmp_path / "s3", _WATERMARK).parent / "records"
    cut = sorted(records.glob("*.batch._S3rver_object"))[-2]  # of the 30: its second batch
    cut.write_bytes(b"")

    third = await start_serve(servers, tmp_path / "data", env)
    await _register(third.url, "key-a", 10, batch=10, first=80)
    await eventually(lambda: _is_total(third.url, "key-a", 80), timeout_s=60)
    [repaired] = [
        line for line in third.output().splitlines() if '"broker_storage_repaired"' in line
    ]
    assert f'"broken_deleted": [{int(cut.name.partition(".")[0])}]' in repaired
    assert '"broken_records": 10' in repaired
    assert third.stop() == 0


def _s3rver_pid(directory: Path) -> int:
    """The pid of the s3rver keeping its objects in ``directory``."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(directory).encode() in args and any(a.endswith(b"s3rver") for a in args):
            return int(entry.name)
    raise AssertionError(f"no s3rver on {directory}")


async def _fifty_stored_on_own_s3(
    broker: EmbeddedBroker, start_stack: StackFactory, settings: ServeSettings, tmp_path: Path
) -> tuple[Stack, str, Path]:
    """The stack on its own broker on S3 storage, with 50 items stored and committed; where
    s3rver keeps the high watermark of the partition."""
    running = await start_stack(bootstrap=broker.bootstrap, own=broker, broker_max_memory_mb=0)
    stack, url = running.stack, running.base_url
    await _register(url, "key-a", 50, batch=10)
    await eventually(lambda: _is_total(url, "key-a", 50), timeout_s=60)
    await eventually(lambda: _committed(stack, {0: 50}))
    return stack, url, _s3_object(tmp_path / "s3", _watermark_of(settings.topic))


async def _revived_behind(
    stack: Stack, broker: EmbeddedBroker, watermark: Path, behind: int, keep_batches: bool = False
) -> Worker | None:
    """Kill the broker, its high watermark set back to ``behind`` (and the batches from there
    on gone, unless ``keep_batches``); the worker the revival starts, as soon as it exists."""
    replaced = stack.worker
    os.kill(_pid(broker), signal.SIGSTOP)
    if keep_batches:
        watermark.write_text(f'{{"low":null,"high":{behind},"timestamps":null}}')
    else:
        _set_back(watermark, behind)
    os.kill(_pid(broker), signal.SIGKILL)
    await eventually(lambda: _replaced(stack, replaced), timeout_s=60, interval_s=0)
    return stack.worker


def _pid(broker: EmbeddedBroker) -> int:
    assert broker.pid is not None
    return broker.pid


async def _committed(stack: Stack, offsets: dict[int, int]) -> bool:
    return stack.worker is not None and stack.worker.committed_offsets() == offsets


async def _replaced(stack: Stack, worker: Worker | None) -> bool:
    return stack.worker is not worker


async def _logged(server: Serve, event: str, times: int) -> bool:
    return server.output().count(f'"{event}"') >= times


async def _is_offset(path: Path, offset: int) -> bool:
    try:
        return bool(json.loads(path.read_bytes())["offset"] == offset)
    except (OSError, ValueError, KeyError):
        return False


async def _registers(url: str, n: int, first: int) -> bool:
    try:
        await _register(url, "key-a", n, batch=n, first=first)
    except (AssertionError, httpx.HTTPError):
        return False
    return True


async def test_dlq_cli_replays_once_by_project_and_lists(
    tmp_path: Path, env: dict[str, str], broker: Broker, topics: tuple[str, str]
) -> None:
    topic, dead_letter_topic = topics
    key, value = event("from-an-old-bug", project="projA")
    producer = create_producer(broker.bootstrap, linger_ms=0)
    await producer.start()
    try:
        headers = [
            ("reason", b"invalid event at item: old bug"),
            ("source_topic", topic.encode()),
            ("source_partition", b"2"),
            ("source_offset", b"7"),
        ]
        await (await producer.send(dead_letter_topic, key=key, value=value, headers=headers))
    finally:
        await producer.stop()
    env = {**env, "MANIAC_TOPIC": topic, "MANIAC_DEAD_LETTER_TOPIC": dead_letter_topic}

    def maniac(*args: str, bootstrap: bool = True, code: int = 0) -> str:
        run_env = {**env, "MANIAC_KAFKA_BOOTSTRAP": broker.bootstrap} if bootstrap else env
        return _maniac(tmp_path, run_env, "dlq", *args, code=code)

    _maniac(tmp_path, env, "migrate")
    assert "POST /v1/dead_letters/replay" in maniac("replay", bootstrap=False, code=2)
    assert "would replay 1 (dry run)" in maniac("replay", "--project", "projA", "--dry-run")
    assert "selected 0" in maniac("replay", "--project", "projB")
    assert "already replayed 0, replayed 1" in maniac("replay", "--project", "projA")
    assert "already replayed 1, replayed 0" in maniac("replay", "--reason", "OLD BUG")
    [line] = maniac("list", "--project", "projA").splitlines()
    assert f"\tprojA\tfrom-an-old-bug\t{topic}/2/7\treplayed " in line
    assert line.endswith("\tinvalid event at item: old bug")
    assert maniac("list", "--project", "projB") == ""

    consumer = create_consumer(broker.bootstrap, group_id=unique("g"), session_timeout_ms=2000)
    await consumer.start()
    consumer.subscribe([topic])
    republished: list[Any] = []
    try:
        for _ in range(100):
            fetched = await consumer.getmany(timeout_ms=300, max_records=10)
            if republished and not fetched:
                break  # read to the end: a second copy would be here by now
            republished += [r for rs in fetched.values() for r in rs]
    finally:
        await consumer.stop()
    assert [(r.key, r.value) for r in republished] == [(key, value)]  # once, as it was


async def test_dead_letters_can_be_replayed_after_a_restart_on_memory_storage(
    tmp_path: Path, env: dict[str, str], servers: list[Serve]
) -> None:
    env = {**env, "MANIAC_API_KEYS": "projA:key-a"}
    first = await start_serve(servers, tmp_path / "data", env)
    found = re.search(r'"bootstrap": "(127\.0\.0\.1:\d+)"', first.output())
    assert found
    producer = create_producer(found.group(1), linger_ms=0)
    await producer.start()
    try:  # a record the worker cannot read: dead-lettered
        await producer.send_and_wait(COMPLETIONS_TOPIC, key=b"projA/bad", value=b"\xff{")
    finally:
        await producer.stop()
    headers = {"Authorization": "Bearer key-a"}

    async def listed(url: str) -> int:
        async with httpx.AsyncClient(base_url=url, headers=headers) as client:
            return len((await client.get("/v1/dead_letters")).json()["data"])

    await eventually(lambda: listed(first.url))
    assert first.stop() == 0

    # the new broker starts empty: the dead letter is written back to it from ClickHouse
    second = await start_serve(servers, tmp_path / "data", env)
    async with httpx.AsyncClient(base_url=second.url, headers=headers) as client:
        replay = await client.post("/v1/dead_letters/replay", params={"dry_run": "true"})
        assert (replay.json()["selected"], replay.json()["replayed"]) == (1, 1)
        done = (await client.post("/v1/dead_letters/replay")).json()
        assert (done["selected"], done["replayed"]) == (1, 1)
    assert '"dead_letters_restored"' in second.output()
    assert second.stop() == 0

    # a replayed dead letter is not written back again (its copy, refused again, is new)
    third = await start_serve(servers, tmp_path / "data", env)
    async with httpx.AsyncClient(base_url=third.url, headers=headers) as client:

        async def refused_again() -> bool:
            data = (await client.get("/v1/dead_letters")).json()["data"]
            return len(data) == 2 and sum(d["replayed_at"] is None for d in data) == 1

        await eventually(refused_again)
        again = (await client.post("/v1/dead_letters/replay", params={"dry_run": "true"})).json()
        assert (again["selected"], again["replayed"]) == (1, 1)
    assert third.stop() == 0
