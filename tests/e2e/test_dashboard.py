"""The built-in /dashboard page in a real headless browser (Debian's chromium)."""

from __future__ import annotations

import asyncio
import re
import shutil
from pathlib import Path

import pytest

from tests.conftest import eventually
from tests.e2e.conftest import KEY_A, RunningStack
from tests.e2e.test_usage import _register

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (`make test` installs it as root)"
)


async def _chromium(*args: str, profile: Path) -> str:
    assert CHROMIUM is not None
    proc = await asyncio.create_subprocess_exec(
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=90)
    return out.decode(errors="replace")


async def test_dashboard_charts_spend_and_tokens_from_the_usage_api(
    api: RunningStack, tmp_path: Path
) -> None:
    await _register(api)

    async def counted() -> bool:
        async with api.client(KEY_A) as client:
            body = (await client.get("/v1/usage", params={"from": 0})).json()
        return bool(sum(d["requests"] for d in body["data"]) == 6)

    await eventually(counted)
    url = f"{api.base_url}/dashboard#key=key-a&range=3650&granularity=day"
    dom = await _chromium(
        "--virtual-time-budget=10000",
        "--window-size=1200,900",
        "--dump-dom",
        url,
        profile=tmp_path / "profile",
    )
    assert 'data-loaded="true"' in dom, dom[-2000:]
    spend_bars = re.findall(r'<rect [^>]*data-series="spend"[^>]*>', dom)
    assert len(spend_bars) == 2  # two days with completions
    assert 'data-bucket="2025-06-16T00:00:00Z"' in spend_bars[0]
    assert len(re.findall(r'data-series="completion_tokens"', dom)) == 2
    requests = re.search(r'data-kpi="requests"><b>([^<]*)</b>', dom)
    assert requests is not None
    assert requests.group(1) == "6"
    assert "openai/gpt-4o-mini" in dom  # the table by model and container
    await _chromium(
        "--virtual-time-budget=10000",
        "--window-size=1200,900",
        f"--screenshot={tmp_path / 'dashboard.png'}",
        url,
        profile=tmp_path / "profile2",
    )
    assert (tmp_path / "dashboard.png").stat().st_size > 10_000


async def test_dashboard_without_a_key_says_so(api: RunningStack, tmp_path: Path) -> None:
    dom = await _chromium(
        "--virtual-time-budget=5000",
        "--dump-dom",
        f"{api.base_url}/dashboard",
        profile=tmp_path / "profile",
    )
    assert re.search(r'<input id="key"[^>]*>', dom)
    assert "data-loaded" not in dom
