"""Added latency of the gateway: the same completions through the gateway and straight to the
upstream, at 1, 50 and 200 concurrent clients, non-streaming, in one run.

Three processes on one machine: a local OpenAI-compatible upstream (``tests/support``), the
whole stack (`maniac serve`, embedded broker and ClickHouse, recording every completion), and
this client. Prints p50/p99 per path and the ratio gateway/direct.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import MANIAC, PYTHON, child, percentile, write_result
from services.common.kafka import free_port

BODY = {"messages": [{"role": "user", "content": "Benchmark the gateway, please."}]}


async def _run(
    url: str, headers: dict[str, str], model: str, concurrency: int, total: int
) -> tuple[list[float], int]:
    """Latencies (ms) of the successful requests, and the number of failed ones."""
    latencies: list[float] = []
    failed = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=60) as client:
        for _ in range(min(20, total)):  # warm up connections
            await client.post(url, json={**BODY, "model": model})
        remaining = total

        async def worker() -> None:
            nonlocal failed, remaining
            while remaining > 0:
                remaining -= 1
                started = time.perf_counter()
                try:
                    response = await client.post(url, json={**BODY, "model": model})
                except httpx.HTTPError:
                    failed += 1
                    continue
                if response.status_code != 200:
                    failed += 1
                    continue
                latencies.append((time.perf_counter() - started) * 1000)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, failed


def _summary(run: tuple[list[float], int]) -> dict[str, float]:
    values, failed = run
    return {
        "p50_ms": round(percentile(values, 50), 2),
        "p99_ms": round(percentile(values, 99), 2),
        "failed": failed,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--levels", default="1,50,200")
    parser.add_argument("--requests", type=int, default=1000, help="per level and path")
    parser.add_argument("--upstream-delay-ms", type=int, default=0)
    args = parser.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",")]
    model = f"slow-{args.upstream_delay_ms}" if args.upstream_delay_ms else "ok"

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        up_port, gw_port = free_port(), free_port()
        up = f"http://127.0.0.1:{up_port}"
        providers = work / "providers.toml"
        providers.write_text(f'[providers.mock]\nbase_url = "{up}/v1"\n')
        upstream_cmd = [
            PYTHON,
            "-c",
            "import uvicorn; from tests.support.upstream import create_upstream; "
            f"uvicorn.run(create_upstream(), port={up_port}, log_level='warning')",
        ]
        serve_cmd = [MANIAC, "serve", "--port", str(gw_port), "--data-dir", str(work / "data")]
        env = {
            "MANIAC_API_KEYS": "bench:bench-key",
            "MANIAC_PROVIDERS_FILE": str(providers),
            "MANIAC_LOG_LEVEL": "warning",
            "MANIAC_RATE_LIMIT_PER_MINUTE": "0",  # measure latency, not the limiter
        }
        with (
            child(upstream_cmd, f"{up}/docs"),
            child(serve_cmd, f"http://127.0.0.1:{gw_port}/readyz", env, work / "serve.log"),
        ):
            results = []
            for level in levels:
                total = max(args.requests, level * 5)
                direct = asyncio.run(_run(f"{up}/v1/chat/completions", {}, model, level, total))
                gateway = asyncio.run(
                    _run(
                        f"http://127.0.0.1:{gw_port}/v1/chat/completions",
                        {"Authorization": "Bearer bench-key"},
                        f"mock/{model}",
                        level,
                        total,
                    )
                )
                row = {
                    "concurrency": level,
                    "requests": total,
                    "direct": _summary(direct),
                    "gateway": _summary(gateway),
                }
                row["ratio_p50"] = round(row["gateway"]["p50_ms"] / row["direct"]["p50_ms"], 2)
                row["ratio_p99"] = round(row["gateway"]["p99_ms"] / row["direct"]["p99_ms"], 2)
                row["added_p50_ms"] = round(row["gateway"]["p50_ms"] - row["direct"]["p50_ms"], 2)
                results.append(row)
                d, g = row["direct"], row["gateway"]
                print(
                    f"c={level:>3}  direct p50 {d['p50_ms']:>7.2f} p99 {d['p99_ms']:>7.2f} ms"
                    f"  | gateway p50 {g['p50_ms']:>7.2f} p99 {g['p99_ms']:>7.2f} ms"
                    f"  | ratio p50 {row['ratio_p50']:.2f} p99 {row['ratio_p99']:.2f}"
                )
    figures = {"upstream_delay_ms": args.upstream_delay_ms, "results": results}
    path = write_result("gateway_latency", figures)
    print(f"written to {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}")
    return figures


if __name__ == "__main__":
    main()
