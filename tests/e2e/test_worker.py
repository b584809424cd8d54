"""`maniac worker` and `maniac query` as their own processes, as a cluster runs them: the
session's broker, a ClickHouse of their own (chDB here, which one process opens at a time)."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
from aiokafka.admin import AIOKafkaAdminClient

from services.common.kafka import EmbeddedBroker, create_producer, free_port
from tests.conftest import Broker, eventually, unique
from tests.support.serve import MANIAC
from tests.support.servers import port_to_bind_later
from tests.support.worker import event, produce


@contextlib.contextmanager
def running(args: list[str], env: dict[str, str], log: Path) -> Iterator[Callable[[], str]]:
    """`maniac ARGS` while the block runs (the function yielded: its output, asserting it
    still runs); stopped with SIGTERM after it, which it must exit 0 from."""
    with log.open("wb") as out:
        process = subprocess.Popen([MANIAC, *args], env=env, stdout=out, stderr=subprocess.STDOUT)

        def alive() -> str:
            assert process.poll() is None, log.read_text()
            return log.read_text()

        try:
            yield alive
        finally:
            process.send_signal(signal.SIGTERM)
            code = process.wait(timeout=60)
    assert code == 0, log.read_text()


async def _answers(
    url: str, check: Callable[[httpx.Response], bool], headers: dict[str, str] | None = None
) -> bool:
    try:
        async with httpx.AsyncClient(headers=headers) as client:
            return check(await client.get(url))
    except httpx.TransportError:
        return False


async def _three_stored(
    bootstrap: str, topic: str, project: str, metrics_port: int, alive: Callable[[], str]
) -> None:
    """Three completions of ``project`` produced, and counted stored by the worker's metrics."""
    producer = create_producer(bootstrap, linger_ms=0)
    await producer.start()
    try:
        await produce(producer, topic, [event(f"c{i}", project) for i in range(3)])
    finally:
        await producer.stop()
    stored = f'maniac_project_records_stored_total{{project="{project}"}} 3.0'

    async def metrics_show_them_stored() -> bool:
        alive()
        metrics = f"http://127.0.0.1:{metrics_port}/metrics"
        return await _answers(metrics, lambda response: stored in response.text)

    await eventually(metrics_show_them_stored, timeout_s=90, interval_s=0.2)


async def test_a_worker_process_stores_serves_its_metrics_and_the_query_process_lists(
    broker: Broker, topics: tuple[str, str], env: dict[str, str], tmp_path: Path
) -> None:
    port, query_port, project = free_port(), free_port(), unique("p")
    env = {
        **env,
        "MANIAC_KAFKA_BOOTSTRAP": broker.bootstrap,
        "MANIAC_CLICKHOUSE_URL": f"chdb://{tmp_path / 'chdb'}",
        "MANIAC_TOPIC": topics[0],
        "MANIAC_DEAD_LETTER_TOPIC": topics[1],
        "MANIAC_CONSUMER_GROUP": unique("group"),
        "MANIAC_METRICS_PORT": str(port),
        "MANIAC_PORT": "tcp://10.0.0.1:8000",  # what a Kubernetes service named `maniac` sets
        "MANIAC_API_KEYS": f"{project}:key-{project}",
    }
    subprocess.run([MANIAC, "migrate"], env=env, check=True, capture_output=True, timeout=120)
    with running(["worker"], env, tmp_path / "worker.log") as alive:
        await _three_stored(broker.bootstrap, topics[0], project, port, alive)

    args = ["query", "--host", "127.0.0.1", "--port", str(query_port)]
    with running(args, env, tmp_path / "query.log") as alive:

        async def listed() -> bool:
            alive()
            return await _answers(
                f"http://127.0.0.1:{query_port}/v1/chat/completions",
                lambda page: page.status_code == 200 and page.json()["total"] == 3,
                headers={"Authorization": f"Bearer key-{project}"},
            )

        await eventually(listed, timeout_s=60, interval_s=0.2)


async def _has_topic(bootstrap: str, topic: str) -> bool:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return topic in await admin.list_topics()
    finally:
        await admin.close()


async def test_a_worker_started_before_its_broker_waits_for_it(
    env: dict[str, str], tmp_path: Path
) -> None:
    # both bound only after the worker has waited: ports no client connection takes meanwhile
    port, metrics_port, project = port_to_bind_later(), port_to_bind_later(), unique("p")
    topic = unique("maniac.completions")
    env = {
        **env,
        "MANIAC_KAFKA_BOOTSTRAP": f"127.0.0.1:{port}",
        "MANIAC_CLICKHOUSE_URL": f"chdb://{tmp_path / 'chdb'}",
        "MANIAC_TOPIC": topic,
        "MANIAC_DEAD_LETTER_TOPIC": unique("maniac.dlq"),
        "MANIAC_CONSUMER_GROUP": unique("group"),
        "MANIAC_METRICS_PORT": str(metrics_port),
        "MANIAC_MIGRATIONS_WAIT_S": "120",
    }
    subprocess.run([MANIAC, "migrate"], env=env, check=True, capture_output=True, timeout=120)
    broker = EmbeddedBroker(port=port, log_file=tmp_path / "tansu.log")
    try:
        with running(["worker"], env, tmp_path / "worker.log") as alive:

            async def waiting() -> bool:
                return "waiting_for_broker" in alive()

            await eventually(waiting, timeout_s=30, interval_s=0.2)
            broker.start()  # a cluster's broker may come up after its workers

            async def topic_created() -> bool:
                alive()
                return await _has_topic(broker.bootstrap, topic)

            await eventually(topic_created, timeout_s=60, interval_s=0.5)
            await _three_stored(broker.bootstrap, topic, project, metrics_port, alive)
    finally:
        broker.stop()


def test_a_clickhouse_server_that_never_answers_is_said_in_one_line(
    env: dict[str, str], tmp_path: Path
) -> None:
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{closed.getsockname()[1]}/maniac"
    env = {**env, "MANIAC_CLICKHOUSE_URL": url, "MANIAC_MIGRATIONS_WAIT_S": "2"}
    args = [MANIAC, "query", "--host", "127.0.0.1", "--port", str(free_port())]
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "waiting_for_clickhouse" in output  # it waited, saying what for
    assert "ClickHouse cannot be reached: " in result.stderr
    assert "Traceback" not in output
