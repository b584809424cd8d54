"""Register ingest, end to end: the first request sent -> every item visible through list.

For each configuration (batch size x concurrent clients) a fresh `maniac serve` runs on the
embedded defaults (Tansu broker, chDB in a temporary directory), and this process sends
``--items`` items of about ``--item-bytes`` each to ``POST /v1/chat/completions/register``.

Figures per configuration:

* throughput: items / (last item visible - first request sent), and the acknowledged rate;
* freshness: for each request, from its acknowledgement to the moment ``total`` of
  ``GET /v1/chat/completions?limit=1`` (polled every ``--poll-ms``, 500 ms by default) covers
  every item acknowledged up to it. Items become visible in the order they were acknowledged
  (one partition, one worker), so this is the time the request's items waited,
  give or take one poll. The poll is a list (with its total) over the growing table: its own
  cost is reported (``list_poll_*``);
* request latency p50/p99;
* RSS of `maniac serve` (gateway, worker and query service in one process) and of the broker,
  sampled every 0.5 s from /proc: at start, peak and end;
* CPU time per item of `maniac serve` (and of its main thread alone: the Python code, which
  holds the GIL, against the ClickHouse engine's threads), the broker and the clients (from
  /proc): on a shared machine this moves far less with other load than the throughput does.

Against real infrastructure: ``--url`` and ``--key`` point the clients at a running gateway
(with its own workers and query service) instead of starting one.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import random
import re
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson

from bench.common import MANIAC, child, load_average, percentile, write_result
from services.cli.importer import register_body
from services.common.kafka import free_port, resident_bytes

KEY = "bench-key"
WORDS = [
    "the",
    "model",
    "returns",
    "a",
    "short",
    "answer",
    "with",
    "context",
    "about",
    "latency",
    "tokens",
    "cache",
    "spend",
    "region",
    "request",
    "user",
    "assistant",
    "system",
    "tool",
    "call",
    "json",
    "schema",
    "retry",
    "upstream",
    "provider",
    "container",
    "evaluation",
    "dataset",
    "label",
    "score",
    "prompt",
    "completion",
    "stream",
    "chunk",
    "usage",
    "price",
    "metric",
    "trace",
]


def _text(rng: random.Random, chars: int) -> str:
    out: list[str] = []
    size = 0
    while size < chars:
        word = rng.choice(WORDS)
        out.append(word)
        size += len(word) + 1
    return " ".join(out)[:chars]


@dataclass
class Template:
    """One item as JSON bytes, split around the places the id and ``created`` go."""

    parts: list[bytes]

    def render(self, completion_id: bytes, created: bytes) -> bytes:
        p = self.parts
        return b"".join((p[0], completion_id, p[1], created, p[2]))


DISTINCT_ITEMS = 10_000
"""Items with texts of their own: no two of this many consecutive items share a text.

More than any record batch or ClickHouse compression block holds, so neither the broker's nor
ClickHouse's compression finds one item's text again in another (zstd made 500 items of 32
texts, as this benchmark first sent, 1.5% of their size; distinct ones take 16%)."""


def templates(item_bytes: int, count: int = DISTINCT_ITEMS, seed: int = 7) -> list[Template]:
    """Items of about ``item_bytes``, each with its own text (so compression is not flattered)."""
    rng = random.Random(seed)
    result = []
    for n in range(count):
        text = max(item_bytes - 660, 100)
        item = {
            "input": {
                "model": "openai/gpt-4o-mini",
                "messages": [
                    {"role": "system", "content": "You are a helpful support assistant."},
                    {"role": "user", "content": _text(rng, text // 2)},
                ],
                "temperature": 0.2,
                "metadata": {"customer": f"customer-{n}", "plan": "pro"},
            },
            "output": {
                "id": "@ID@",
                "object": "chat.completion",
                "created": "@CREATED@",
                "model": "openai/gpt-4o-mini",
                "provider": "openai",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": _text(rng, text // 2)},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": 310 + n,
                    "completion_tokens": 120 + n,
                    "total_tokens": 430 + 2 * n,
                    "prompt_tokens_details": {"cached_tokens": 64},
                    "completion_tokens_details": {"reasoning_tokens": 0},
                },
            },
            "tags": ["bench", f"t{n % 4}"],
            "metadata": {"split": "train"},
        }
        raw = orjson.dumps(item)
        head, rest = raw.split(b'"@ID@"')
        middle, tail = rest.split(b'"@CREATED@"')
        result.append(Template([head + b'"', b'"' + middle, tail]))
    return result


def completion_id(run: str, batch: int, index: int) -> bytes:
    """A provider's completion id: ``chatcmpl-`` and 29 characters that look random.

    Ids that count up (``chatcmpl-<run>-<batch>-<i>``, this benchmark's first ids) put a
    request's items next to each other in the primary key of `completions`, so the worker's
    lookup of which ones were stored read a few granules; real ids are random, and the
    same lookup reads the whole project's ids (see the deduplication figures in the README).
    """
    digest = hashlib.blake2b(f"{run}-{batch}-{index}".encode(), digest_size=15).hexdigest()
    return b"chatcmpl-" + digest[:29].encode()


def request_body(
    parts: list[Template], run: str, batch: int, size: int, container: str = "bench"
) -> bytes:
    created = str(1_767_225_600 + batch).encode()
    items = [
        parts[(batch * size + i) % len(parts)].render(completion_id(run, batch, i), created)
        for i in range(size)
    ]
    return register_body(container, items)


# -- resident memory -------------------------------------------------------------------------


def _rss_kib(pid: int) -> int | None:
    found = resident_bytes(pid)
    return None if found is None else found // 1024


_TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_s(pid: int, *, thread: int | None = None) -> float:
    """User + system CPU seconds a process (or one of its threads) has used so far."""
    stat = f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat"
    try:
        fields = Path(stat).read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICKS


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # the command may contain spaces and parentheses: the ppid follows the last ')'
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


@dataclass
class MemorySampler:
    """RSS and CPU of `maniac serve`, of its broker child, and of its other children (the
    worker's processes, when ``MANIAC_WORKER_PROCESSES`` is set), every ``interval_s``."""

    pid: int
    interval_s: float = 0.5
    samples: list[tuple[float, int, int, int]] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _groups(self) -> tuple[list[int], list[int]]:
        children = _children(self.pid)
        broker = [c for c in children if _comm(c) == "tansu"]
        return broker, [c for c in children if c not in broker]

    def _run(self) -> None:
        started = time.perf_counter()
        broker, others = self._groups()
        first = {c: _cpu_s(c) for c in broker + others}
        last = dict(first)
        ever_broker = set(broker)
        cpu = (_cpu_s(self.pid), time.process_time(), _cpu_s(self.pid, thread=self.pid))
        while not self._stop.is_set():
            broker, others = self._groups()
            ever_broker.update(broker)
            for c in broker + others:
                first.setdefault(c, 0.0)  # started during the run: all its CPU counts
                # a broker started afresh is gone at the end: its CPU as last seen (up to one
                # interval of it is missed)
                last[c] = max(last.get(c, 0.0), _cpu_s(c))
            self.samples.append(
                (
                    time.perf_counter() - started,
                    _rss_kib(self.pid) or 0,
                    sum(_rss_kib(c) or 0 for c in broker),
                    sum(_rss_kib(c) or 0 for c in others),
                )
            )
            self._stop.wait(self.interval_s)
        self.cpu = {
            "serve": round(_cpu_s(self.pid) - cpu[0], 2),
            # of which its main thread: Python (gateway, worker, query service) holding the
            # GIL; the rest is the ClickHouse engine's threads and compression off the GIL
            "serve_main_thread": round(_cpu_s(self.pid, thread=self.pid) - cpu[2], 2),
            "broker": round(sum(max(last[c], _cpu_s(c)) - first[c] for c in ever_broker), 2),
            "worker_processes": round(sum(_cpu_s(c) - first[c] for c in others), 2),
            "clients": round(time.process_time() - cpu[1], 2),
        }

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if not self.samples:
            return {}

        def summary(column: int) -> dict[str, Any]:
            values = [s[column] / 1024 for s in self.samples]
            end_s = self.samples[-1][0]
            return {
                "start_mb": round(values[0], 1),
                "peak_mb": round(max(values), 1),
                "end_mb": round(values[-1], 1),
                # whether it stays flat: the RSS at each tenth of the run
                "by_tenth_mb": [
                    round(next(s[column] for s in self.samples if s[0] >= end_s * k / 10) / 1024)
                    for k in range(1, 11)
                ],
            }

        result: dict[str, Any] = {"serve": summary(1), "broker": summary(2)}
        if any(s[3] for s in self.samples):
            result["worker_processes"] = summary(3)
        result["cpu_s"] = self.cpu
        return result


# -- one run ---------------------------------------------------------------------------------


@dataclass
class Acks:
    times: list[float] = field(default_factory=list)
    cumulative: list[int] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    failed: int = 0
    count: int = 0


async def _visible(client: httpx.AsyncClient, url: str) -> int:
    response = await client.get(url, params={"limit": 1})
    response.raise_for_status()
    return int(response.json()["total"])


async def _ingest(
    base: str, key: str, *, items: int, batch: int, clients: int, item_bytes: int, poll_s: float
) -> dict[str, Any]:
    parts = templates(item_bytes)
    run = uuid.uuid4().hex[:8]
    batches = (items + batch - 1) // batch
    register = f"{base}/v1/chat/completions/register"
    listing = f"{base}/v1/chat/completions"
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    limits = httpx.Limits(max_connections=clients + 2, max_keepalive_connections=clients + 2)
    acks = Acks()
    polls: list[tuple[float, int]] = []
    poll_ms: list[float] = []
    next_batch = 0
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=300) as client:
        before = await _visible(client, listing)
        started = time.perf_counter()

        async def send() -> None:
            nonlocal next_batch
            while next_batch < batches:
                n = next_batch
                next_batch += 1
                size = min(batch, items - n * batch)
                body = request_body(parts, run, n, size)
                sent = time.perf_counter()
                response = await client.post(register, content=body)
                done = time.perf_counter()
                accepted = response.json()["summary"]["accepted"] if response.is_success else 0
                if accepted != size:
                    acks.failed += 1
                    raise RuntimeError(f"batch {n}: {response.status_code} {response.text[:300]}")
                acks.count += size
                acks.times.append(done - started)
                acks.cumulative.append(acks.count)
                acks.latencies.append((done - sent) * 1000)

        async def poll() -> None:
            while True:
                asked = time.perf_counter()
                seen = await _visible(client, listing) - before
                polls.append((time.perf_counter() - started, seen))
                poll_ms.append((time.perf_counter() - asked) * 1000)
                if seen >= items:
                    return
                await asyncio.sleep(poll_s)

        poller = asyncio.create_task(poll())
        await asyncio.gather(*(send() for _ in range(clients)))
        acked_s = time.perf_counter() - started
        await asyncio.wait_for(poller, timeout=600)
    visible_s = polls[-1][0]

    freshness: list[float] = []
    index = 0
    for at, cumulative in zip(acks.times, acks.cumulative, strict=True):
        while index < len(polls) and (polls[index][0] < at or polls[index][1] < cumulative):
            index += 1
        freshness.append((polls[index][0] - at) if index < len(polls) else float("nan"))
    return {
        "items": items,
        "batch": batch,
        "clients": clients,
        "requests": len(acks.latencies),
        "acked_s": round(acked_s, 2),
        "visible_s": round(visible_s, 2),
        "items_per_s": round(items / visible_s),
        "acked_items_per_s": round(items / acked_s),
        "freshness_p50_s": round(percentile(freshness, 50), 3),
        "freshness_p99_s": round(percentile(freshness, 99), 3),
        "freshness_max_s": round(max(freshness), 3),
        "request_p50_ms": round(percentile(acks.latencies, 50), 1),
        "request_p99_ms": round(percentile(acks.latencies, 99), 1),
        "list_polls": len(poll_ms),
        "list_poll_p50_ms": round(percentile(poll_ms, 50), 1),
        "list_poll_max_ms": round(max(poll_ms), 1),
    }


def run_embedded(
    *, items: int, batch: int, clients: int, item_bytes: int, poll_s: float, env: dict[str, str]
) -> dict[str, Any]:
    """One configuration on a fresh `maniac serve` (embedded broker and chDB)."""
    with tempfile.TemporaryDirectory(prefix="maniac-bench-") as tmp:
        work = Path(tmp)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        serve = [MANIAC, "serve", "--port", str(port), "--data-dir", str(work / "data")]
        settings = {
            "MANIAC_API_KEYS": f"bench:{KEY}",
            "MANIAC_LOG_LEVEL": "warning",
            "MANIAC_RATE_LIMIT_PER_MINUTE": "0",  # measure the pipeline, not the limiter
            **env,
        }
        with child(serve, f"{base}/readyz", settings, work / "serve.log") as proc:
            time.sleep(3)  # let start-up settle
            memory = MemorySampler(proc.pid)
            memory.start()
            load_before = load_average()
            try:
                figures = asyncio.run(
                    _ingest(
                        base,
                        KEY,
                        items=items,
                        batch=batch,
                        clients=clients,
                        item_bytes=item_bytes,
                        poll_s=poll_s,
                    )
                )
            finally:
                rss = memory.stop()
            figures["broker_restarts"] = _broker_restarts(base)
            figures["rss"] = rss
            cpu = rss.pop("cpu_s", {})
            figures["cpu_s"] = cpu
            figures["cpu_us_per_item"] = {k: round(v / items * 1e6, 1) for k, v in cpu.items()}
            figures["load_before"] = load_before
            figures["load_after"] = load_average()
    return figures


def _broker_restarts(base: str) -> int:
    """How often `maniac serve` started its embedded broker afresh (``/metrics``)."""
    text = httpx.get(f"{base}/metrics", timeout=10).text
    found = re.findall(r"^maniac_broker_restarts_total\{[^}]*\} ([0-9.e+]+)$", text, re.M)
    return int(sum(float(n) for n in found))


def _print(row: dict[str, Any]) -> None:
    rss = row.get("rss", {})
    serve = rss.get("serve", {})
    broker = rss.get("broker", {})
    print(
        f"batch={row['batch']:>5} clients={row['clients']:>2} items={row['items']:>8}: "
        f"{row['items_per_s']:>6} items/s end to end ({row['acked_items_per_s']} acked/s), "
        f"freshness p50 {row['freshness_p50_s']:.2f} s p99 {row['freshness_p99_s']:.2f} s, "
        f"request p50 {row['request_p50_ms']:.0f} ms p99 {row['request_p99_ms']:.0f} ms"
    )
    if serve:
        print(
            f"    RSS serve start/peak/end {serve['start_mb']:.0f}/{serve['peak_mb']:.0f}/"
            f"{serve['end_mb']:.0f} MB, broker {broker['start_mb']:.0f}/{broker['peak_mb']:.0f}/"
            f"{broker['end_mb']:.0f} MB (started afresh {row.get('broker_restarts', 0)} times); "
            f"load {row['load_before']} -> {row['load_after']}"
        )
    if serve.get("by_tenth_mb"):
        print(
            f"    RSS by tenth of the run: serve {serve['by_tenth_mb']} MB, "
            f"broker {broker['by_tenth_mb']} MB"
        )
    if "worker_processes" in rss:
        pool = rss["worker_processes"]
        print(
            f"    RSS worker processes start/peak/end {pool['start_mb']:.0f}/"
            f"{pool['peak_mb']:.0f}/{pool['end_mb']:.0f} MB"
        )
    if row.get("cpu_us_per_item"):
        cpu = row["cpu_us_per_item"]
        print(
            f"    CPU per item: serve {cpu['serve']} us (main thread "
            f"{cpu.get('serve_main_thread', '-')} us), worker processes "
            f"{cpu['worker_processes']} us, broker {cpu['broker']} us, clients {cpu['clients']} us"
        )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1_000_000, help="items per configuration")
    parser.add_argument("--batches", default="100,1000", help="items per request")
    parser.add_argument("--clients", default="1,8", help="concurrent clients")
    parser.add_argument("--item-bytes", type=int, default=2048)
    parser.add_argument("--poll-ms", type=int, default=500, help="list poll interval")
    parser.add_argument("--url", default=None, help="a running gateway instead of `maniac serve`")
    parser.add_argument("--key", default=KEY)
    parser.add_argument("--name", default="ingest", help="result file: bench/results/NAME.json")
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra setting for `maniac serve` (repeatable)",
    )
    args = parser.parse_args(argv)
    env = dict(pair.split("=", 1) for pair in args.env)
    results = []
    for batch in (int(x) for x in args.batches.split(",")):
        for clients in (int(x) for x in args.clients.split(",")):
            shape = {"items": args.items, "batch": batch, "clients": clients}
            if args.url:
                load_before = load_average()
                row = asyncio.run(
                    _ingest(
                        args.url.rstrip("/"),
                        args.key,
                        **shape,
                        item_bytes=args.item_bytes,
                        poll_s=args.poll_ms / 1000,
                    )
                )
                row["load_before"], row["load_after"] = load_before, load_average()
            else:
                row = run_embedded(
                    **shape, item_bytes=args.item_bytes, poll_s=args.poll_ms / 1000, env=env
                )
            _print(row)
            results.append(row)
    figures = {
        "target": {"items_per_s": 20_000, "freshness_p99_s": 2.0},
        "item_bytes": args.item_bytes,
        "item_json_bytes": len(
            templates(args.item_bytes, count=1)[0].render(b"x" * 40, b"1767225600")
        ),
        "backend": args.url or "embedded (maniac serve: Tansu + chDB)",
        "settings": env,
        "results": results,
    }
    path = write_result(args.name, figures)
    print(f"written to {path}")
    return figures


if __name__ == "__main__":
    main()
