"""List and get latency on a large table: 10,000,000 stored completions across 100 projects.

The rows are generated inside ClickHouse (``INSERT ... SELECT ... FROM numbers(...)``, in
chunks), with the columns the worker writes and a response and request of realistic size
(about 1.4 KB and 0.6 KB of JSON with varied text). Then every case is timed through the query
service's repository (the SQL list and get run, on the embedded chDB), ``--runs`` times each,
rotating over the projects:

* list: no filter, ``model``, ``container``, and both; ``order`` desc and asc; offset 0 and
  10,000 (page of 20);
* get by id (a random stored completion of the project).

``--data-dir`` keeps the generated table for later runs (generation takes minutes);
``--projects 1`` puts every row in one project, as a large import into one container does.
``--clickhouse-url`` runs the same on a ClickHouse server instead of chDB
(``http://user:password@host:8123/database``; the database is migrated, then filled up to
``--rows``).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import random
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import load_average, percentile, write_result
from services.common.clickhouse import ClickHouse, ClickHouseTarget
from services.common.migrations import migrate
from services.query.repository import CompletionsRepository

PROJECTS = 100
MODELS = [
    "openai/gpt-4o",
    "openai/gpt-4o-mini",
    "anthropic/claude-sonnet-4",
    "anthropic/claude-haiku-4",
    "google/gemini-2.5-pro",
    "google/gemini-2.5-flash",
    "meta/llama-3.3-70b",
    "mistral/mistral-large",
]
CONTAINERS = [f"bot-{n}" for n in range(10)]
WORDS = [
    "the", "model", "returns", "a", "short", "answer", "with", "context", "about", "latency",
    "tokens", "cache", "spend", "region", "request", "user", "assistant", "system", "tool",
    "call", "json", "schema", "retry", "upstream", "provider", "container", "evaluation",
    "dataset", "label", "score", "prompt", "completion", "stream", "chunk", "usage", "price",
    "metric", "trace", "invoice", "refund",
]  # fmt: skip


def _array(values: list[str]) -> str:
    return "[" + ",".join(f"'{v}'" for v in values) + "]"


def _text(words: int, salt: int) -> str:
    """SQL for ``words`` words of varied text, different for every row."""
    return (
        f"arrayStringConcat(arrayMap(i -> {_array(WORDS)}[1 + cityHash64(number, i, {salt}) % "
        f"{len(WORDS)}], range({words})), ' ')"
    )


def insert_sql(start: int, count: int, projects: int = PROJECTS) -> str:
    """``count`` completions numbered from ``start``: project = number % ``projects``."""
    return f"""
INSERT INTO {{database}}.completions_in (project, completion_id, created, received_at, kind, model,
    provider, container, finish_reason, prompt_tokens, completion_tokens, total_tokens,
    cached_tokens, spend, spend_source, usage_source, tags, response, request)
SELECT project, completion_id, created, created + toIntervalSecond(1), 'register', model,
    splitByChar('/', model)[1], container, 'stop', prompt, completion, prompt + completion, 0,
    NULL, 'no_usage', 'provider', ['bench'],
    concat('{{"id":"', completion_id, '","object":"chat.completion","created":',
        toString(toUnixTimestamp(created)), ',"model":"', model,
        '","choices":[{{"index":0,"message":{{"role":"assistant","content":"', answer,
        '"}},"finish_reason":"stop"}}],"usage":{{"prompt_tokens":', toString(prompt),
        ',"completion_tokens":', toString(completion), ',"total_tokens":',
        toString(prompt + completion), '}},"provider":"', splitByChar('/', model)[1],
        '","container":"', container, '","model_id":null,"spend":null,"tags":["bench"],',
        '"metadata":{{"customer":"c', toString(number % 977), '"}},"trace":null}}'),
    concat('{{"model":"', model, '","messages":[{{"role":"system","content":"You are a helpful ',
        'support assistant."}},{{"role":"user","content":"', question, '"}}],',
        '"temperature":0.2,"metadata":{{"customer":"c', toString(number % 977), '"}}}}')
FROM (
    SELECT number,
        concat('p', toString(number % {projects})) AS project,
        concat('chatcmpl-', lower(hex(MD5(toString(number))))) AS completion_id,
        toDateTime64(1760000000 + intHash32(number) % 7776000, 3, 'UTC')
            + toIntervalMillisecond(cityHash64(number, 1) % 1000) AS created,
        {_array(MODELS)}[1 + cityHash64(number, 2) % {len(MODELS)}] AS model,
        {_array(CONTAINERS)}[1 + cityHash64(number, 3) % {len(CONTAINERS)}] AS container,
        toUInt64(200 + cityHash64(number, 4) % 2000) AS prompt,
        toUInt64(20 + cityHash64(number, 5) % 800) AS completion,
        {_text(190, 1)} AS answer,
        {_text(70, 2)} AS question
    FROM numbers({start}, {count})
)
"""


def completion_id(number: int) -> str:
    return f"chatcmpl-{hashlib.md5(str(number).encode()).hexdigest()}"


async def generate(ch: ClickHouse, rows: int, chunk: int, projects: int = PROJECTS) -> float:
    started = time.perf_counter()
    stored = int((await ch.rows("SELECT count() FROM {database}.completions"))[0][0])
    for start in range(stored, rows, chunk):
        count = min(chunk, rows - start)
        await ch.command(insert_sql(start, count, projects))
        print(f"    generated {start + count:>10} rows ({time.perf_counter() - started:.0f} s)")
    return time.perf_counter() - started


def cases() -> list[dict[str, Any]]:
    result = []
    for filters in ("none", "model", "container", "model+container"):
        for order in ("desc", "asc"):
            for offset in (0, 10_000):
                result.append({"filters": filters, "order": order, "offset": offset})
    return result


async def measure(
    ch: ClickHouse, runs: int, rows: int, seed: int = 11, projects: int = PROJECTS
) -> list[dict[str, Any]]:
    repository = CompletionsRepository(ch)
    rng = random.Random(seed)
    results = []
    for case in cases():
        timings = []
        for run in range(runs + 3):  # the first three warm the caches, and are not counted
            project = f"p{rng.randrange(projects)}"
            model = rng.choice(MODELS) if "model" in case["filters"] else None
            container = rng.choice(CONTAINERS) if "container" in case["filters"] else None
            started = time.perf_counter()
            page, total = await repository.list(
                project,
                limit=20,
                offset=case["offset"],
                model=model,
                container=container,
                order=case["order"],
            )
            if run >= 3:
                timings.append((time.perf_counter() - started) * 1000)
            if case["offset"] == 0 and total and not page:
                raise RuntimeError(f"empty page for {case}")
        results.append({"query": "list", **case, **_stats(timings)})
        print(_line(results[-1]))
    timings = []
    for run in range(runs + 3):
        number = rng.randrange(rows)
        started = time.perf_counter()
        found = await repository.get(f"p{number % projects}", completion_id(number))
        if run >= 3:
            timings.append((time.perf_counter() - started) * 1000)
        if found is None:
            raise RuntimeError(f"completion {number} not found")
    results.append({"query": "get", **_stats(timings)})
    print(_line(results[-1]))
    return results


def _stats(timings: list[float]) -> dict[str, Any]:
    return {
        "runs": len(timings),
        "p50_ms": round(percentile(timings, 50), 1),
        "p99_ms": round(percentile(timings, 99), 1),
        "max_ms": round(max(timings), 1),
    }


def _line(row: dict[str, Any]) -> str:
    what = (
        f"list {row['filters']:<15} {row['order']:<4} offset {row['offset']:>5}"
        if row["query"] == "list"
        else f"get by id{'':<33}"
    )
    return f"{what}  p50 {row['p50_ms']:>7.1f} ms  p99 {row['p99_ms']:>7.1f} ms"


async def _run(
    target: ClickHouseTarget, rows: int, runs: int, chunk: int, projects: int
) -> dict[str, Any]:
    ch = ClickHouse.connect(target)
    try:
        await migrate(ch)
        print(f"  generating {rows} rows across {projects} projects")
        generate_s = await generate(ch, rows, chunk, projects)
        table = (
            await ch.rows(
                "SELECT count(), sum(rows), sum(data_compressed_bytes), "
                "sum(data_uncompressed_bytes) FROM system.parts "
                "WHERE database = {db:String} AND table = 'completions' AND active",
                {"db": ch.database},
            )
        )[0]
        print(
            f"  {table[1]} rows in {table[0]} parts, "
            f"{table[2] / 2**30:.2f} GiB compressed ({table[3] / 2**30:.2f} GiB raw)"
        )
        read = await ch.rows(
            "SELECT table, count(), sum(data_compressed_bytes) FROM system.parts "
            "WHERE database = {db:String} AND active "
            "AND table IN ('completion_listing', 'completion_responses') GROUP BY table",
            {"db": ch.database},
        )
        read_tables = {
            str(r[0]): {"parts": int(r[1]), "compressed_gib": round(r[2] / 2**30, 2)} for r in read
        }
        print(f"  tables the list reads: {read_tables}")
        load_before = load_average()
        results = await measure(ch, runs, rows, projects=projects)
        return {
            "backend": "chDB (embedded)" if target.interface == "chdb" else "ClickHouse server",
            "rows": rows,
            "projects": projects,
            "generate_s": round(generate_s, 1),
            "parts": int(table[0]),
            "compressed_gib": round(table[2] / 2**30, 2),
            "uncompressed_gib": round(table[3] / 2**30, 2),
            "read_tables": read_tables,
            "load_before": load_before,
            "load_after": load_average(),
            "results": results,
        }
    finally:
        ch.close()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--runs", type=int, default=200, help="timed runs per case")
    parser.add_argument("--chunk", type=int, default=1_000_000, help="rows per INSERT")
    parser.add_argument("--projects", type=int, default=PROJECTS, help="rows spread over")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--data-dir", type=Path, default=None, help="keep the table here")
    where.add_argument(
        "--clickhouse-url", default=None, help="a ClickHouse server (http://...) instead of chDB"
    )
    parser.add_argument("--name", default="query", help="result file: bench/results/NAME.json")
    args = parser.parse_args(argv)
    shape = (args.rows, args.runs, args.chunk, args.projects)
    if args.clickhouse_url is not None:
        figures = asyncio.run(_run(ClickHouseTarget.parse(args.clickhouse_url), *shape))
    elif args.data_dir is not None:
        figures = asyncio.run(_run(ClickHouseTarget.embedded(args.data_dir), *shape))
    else:
        with tempfile.TemporaryDirectory(prefix="maniac-bench-") as tmp:
            figures = asyncio.run(_run(ClickHouseTarget.embedded(Path(tmp)), *shape))
    figures["target"] = {"p99_ms": 50}
    path = write_result(args.name, figures)
    print(f"written to {path}")
    return figures


if __name__ == "__main__":
    main()
