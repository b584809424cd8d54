"""`maniac serve` as a user runs it: one process, embedded broker and ClickHouse."""

from __future__ import annotations

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

from services.common.kafka import create_consumer, create_producer, free_port
from tests.conftest import Broker, eventually, unique
from tests.support.worker import event

MANIAC = str(Path(sys.executable).parent / "maniac")


class Serve:
    def __init__(self, data_dir: Path, env: dict[str, str]) -> None:
        self.port = free_port()
        self.data_dir = data_dir
        self.env = env
        self.log = data_dir.parent / f"serve-{self.port}.log"

    def start(self) -> None:
        self.log_handle = self.log.open("wb")
        self.proc = subprocess.Popen(
            [MANIAC, "serve", "--port", str(self.port), "--data-dir", str(self.data_dir)],
            stdout=self.log_handle,
            stderr=subprocess.STDOUT,
            env=self.env,
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def ready(self) -> None:
        async def check() -> bool:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                async with httpx.AsyncClient() as client:
                    return (await client.get(f"{self.url}/readyz")).status_code == 200
            except httpx.TransportError:
                return False

        await eventually(check, timeout_s=60, interval_s=0.2)

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60) -> int:
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout=timeout_s)
        self.log_handle.close()
        return code

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def env() -> dict[str, str]:
    return {
        **os.environ,
        "MANIAC_SESSION_TIMEOUT_MS": "2000",
        "MANIAC_HEARTBEAT_INTERVAL_MS": "300",
        "MANIAC_LOG_FORMAT": "json",
    }


@pytest.fixture
def servers() -> Iterator[list[Serve]]:
    started: list[Serve] = []
    yield started
    for server in started:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()


async def _register(url: str, key: str, n: int, batch: int = 100) -> None:
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}) as c:
        for start in range(0, n, batch):
            items: list[dict[str, Any]] = [
                {
                    "input": {"messages": [{"role": "user", "content": f"q{i}"}]},
                    "output": {"id": f"id-{i}", "choices": [], "created": 1_700_000_000 + i},
                }
                for i in range(start, min(start + batch, n))
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


async def test_sigterm_drains_everything_acknowledged_and_it_survives_restart(
    tmp_path: Path, env: dict[str, str], servers: list[Serve]
) -> None:
    env = {**env, "MANIAC_API_KEYS": "projA:key-a"}
    first = Serve(tmp_path / "data", env)
    servers.append(first)
    first.start()
    await first.ready()
    await _register(first.url, "key-a", 1000)
    # stop at once: nothing has been waited for, the drain must store all 1000
    assert first.stop() == 0
    assert '"drained"' in first.output()

    second = Serve(tmp_path / "data", env)
    servers.append(second)
    second.start()
    await second.ready()
    assert await _total(second.url, "key-a") == 1000
    assert second.stop(signal.SIGINT) == 0


async def test_without_keys_a_dev_key_is_created_and_printed(
    tmp_path: Path, env: dict[str, str], servers: list[Serve]
) -> None:
    env.pop("MANIAC_API_KEYS", None)
    server = Serve(tmp_path / "data", env)
    servers.append(server)
    server.start()
    await server.ready()
    match = re.search(r"\b(mk-[A-Za-z0-9_\-]{40,})", server.output())
    assert match, server.output()
    key = match.group(1)
    await _register(server.url, key, 3)
    await eventually(lambda: _is_total(server.url, key, 3))
    assert server.stop() == 0


async def _is_total(url: str, key: str, n: int) -> bool:
    return await _total(url, key) == n


def test_keys_cli_creates_lists_and_revokes(tmp_path: Path, env: dict[str, str]) -> None:
    def maniac(*args: str) -> str:
        result = subprocess.run(
            [MANIAC, *args, "--data-dir", str(tmp_path)],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    assert "applied migrations" in maniac("migrate")
    key = maniac("keys", "create", "--project", "projX").strip()
    assert key.startswith("mk-")
    listed = maniac("keys", "list")
    assert "projX" in listed
    assert key not in listed
    key_id = listed.split()[0]
    assert "revoked 1" in maniac("keys", "revoke", key_id)
    assert "projX" not in maniac("keys", "list")


async def test_kill_9_does_not_leave_the_embedded_broker_behind(
    tmp_path: Path, env: dict[str, str], servers: list[Serve]
) -> None:
    server = Serve(tmp_path / "data", {**env, "MANIAC_API_KEYS": "p:k"})
    servers.append(server)
    server.start()
    await server.ready()
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
        result = subprocess.run(
            [MANIAC, "dlq", *args, "--data-dir", str(tmp_path)],
            env=run_env,
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == code, result.stderr
        return result.stdout + result.stderr

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
