"""`maniac worker` and `maniac query` as their own processes, as a cluster runs them: the
session's broker, a ClickHouse of their own (chDB here, which one process opens at a time)."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import httpx

from services.common.kafka import create_producer, free_port
from tests.conftest import Broker, eventually, unique
from tests.support.serve import MANIAC
from tests.support.worker import event, produce


async def test_a_worker_process_stores_serves_its_metrics_and_the_query_process_lists(
    broker: Broker, topics: tuple[str, str], env: dict[str, str], tmp_path: Path
) -> None:
    port = free_port()
    env = {
        **env,
        "MANIAC_KAFKA_BOOTSTRAP": broker.bootstrap,
        "MANIAC_CLICKHOUSE_URL": f"chdb://{tmp_path / 'chdb'}",
        "MANIAC_TOPIC": topics[0],
        "MANIAC_DEAD_LETTER_TOPIC": topics[1],
        "MANIAC_CONSUMER_GROUP": unique("group"),
        "MANIAC_METRICS_PORT": str(port),
        "MANIAC_PORT": "tcp://10.0.0.1:8000",  # what a Kubernetes service named `maniac` sets
    }
    subprocess.run([MANIAC, "migrate"], env=env, check=True, capture_output=True, timeout=120)
    log = (tmp_path / "worker.log").open("wb")
    worker = subprocess.Popen([MANIAC, "worker"], env=env, stdout=log, stderr=subprocess.STDOUT)
    project = unique("p")
    env["MANIAC_API_KEYS"] = f"{project}:key-{project}"
    try:
        producer = create_producer(broker.bootstrap, linger_ms=0)
        await producer.start()
        try:
            await produce(producer, topics[0], [event(f"c{i}", project) for i in range(3)])
        finally:
            await producer.stop()

        stored = f'maniac_project_records_stored_total{{project="{project}"}} 3.0'

        async def metrics_show_them_stored() -> bool:
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()
            try:
                async with httpx.AsyncClient() as client:
                    text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
            except httpx.TransportError:
                return False
            return stored in text

        await eventually(metrics_show_them_stored, timeout_s=90, interval_s=0.2)
    finally:
        worker.send_signal(signal.SIGTERM)
        code = worker.wait(timeout=60)
        log.close()
    assert code == 0, (tmp_path / "worker.log").read_text()

    query_port = free_port()
    log = (tmp_path / "query.log").open("wb")
    query = subprocess.Popen(
        [MANIAC, "query", "--host", "127.0.0.1", "--port", str(query_port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        headers = {"Authorization": f"Bearer key-{project}"}

        async def listed() -> object:
            assert query.poll() is None, (tmp_path / "query.log").read_text()
            try:
                async with httpx.AsyncClient(headers=headers) as client:
                    page = await client.get(f"http://127.0.0.1:{query_port}/v1/chat/completions")
            except httpx.TransportError:
                return False
            return page.status_code == 200 and page.json()["total"] == 3

        await eventually(listed, timeout_s=60, interval_s=0.2)
    finally:
        query.send_signal(signal.SIGTERM)
        code = query.wait(timeout=60)
        log.close()
    assert code == 0, (tmp_path / "query.log").read_text()
