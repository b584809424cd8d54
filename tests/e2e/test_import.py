"""`maniac import` as a user runs it, against the whole stack over HTTP."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from fastapi import FastAPI, Request, Response

from services.common.clickhouse import ClickHouse
from services.common.kafka import free_port
from tests.conftest import eventually
from tests.e2e.conftest import KEY_A, RunningStack, StackFactory
from tests.support.serve import MANIAC
from tests.support.servers import serving


async def _import(
    url: str, *args: str, key: str = "key-a", stdin: bytes | None = None
) -> tuple[int, dict[str, Any], str]:
    """Run `maniac import`; its exit code, its summary line and its stderr."""
    proc = await asyncio.create_subprocess_exec(
        MANIAC,
        "import",
        *args,
        "--url",
        url,
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "MANIAC_API_KEY": key},
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin), timeout=300)
    assert proc.returncode is not None
    assert key not in out.decode() + err.decode()
    [line] = out.decode().splitlines()
    return proc.returncode, orjson.loads(line), err.decode()


def _item(n: int, text: str = "") -> dict[str, Any]:
    return {
        "input": {"messages": [{"role": "user", "content": f"question {n} {text}"}]},
        "output": {
            "id": f"imp-{n}",
            "created": 1_767_225_600 + n,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": f"answer {n}"}}],
        },
    }


def _write(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


async def _listed(api: RunningStack, container: str, count: int) -> list[dict[str, Any]]:
    """Every completion of ``container``, once ``count`` are visible."""
    async with api.client(KEY_A) as client:

        async def total() -> int:
            response = await client.get(
                "/v1/chat/completions", params={"container": container, "limit": 1}
            )
            return int(response.json()["total"])

        await eventually(lambda: _is(total, count), timeout_s=60, interval_s=0.2)
        found: list[dict[str, Any]] = []
        while len(found) < count:
            response = await client.get(
                "/v1/chat/completions",
                params={"container": container, "limit": 100, "offset": len(found)},
            )
            found += response.json()["data"]
        return found


async def _is(total: Callable[[], Any], count: int) -> bool:
    found = await total()
    assert found <= count
    return bool(found == count)


async def test_an_import_stores_every_good_line_and_reports_the_rest_by_line_number(
    api: RunningStack, tmp_path: Path
) -> None:
    lines: list[bytes] = []
    good: set[int] = set()
    bad_json: set[int] = set()
    not_object: set[int] = set()
    rejected: set[int] = set()
    for n in range(1, 3001):
        if n % 97 == 0:
            lines.append(b'{"input": {"messages": [')  # cut short
            bad_json.add(n)
        elif n % 89 == 0:
            lines.append(b"[1, 2]")
            not_object.add(n)
        elif 1201 <= n <= 1650 or n % 101 == 0:
            # 450 in a row: a batch of 500 items holds more than the 200 errors a response lists
            lines.append(orjson.dumps({"input": {"messages": "not a list"}}))
            rejected.add(n)
        elif n % 50 == 0:
            lines.append(b"")
        else:
            lines.append(orjson.dumps(_item(n)))
            good.add(n)
    source = _write(tmp_path / "items.jsonl", lines)
    errors = tmp_path / "errors.jsonl"

    code, summary, stderr = await _import(
        api.base_url, str(source), "--container", "imported", "--errors", str(errors)
    )

    assert code == 1, stderr
    assert stderr == ""
    received = len(good) + len(bad_json) + len(not_object) + len(rejected)
    assert {k: summary[k] for k in ("received", "accepted", "rejected", "bad_json")} == {
        "received": received,
        "accepted": len(good),
        "rejected": len(rejected),
        "bad_json": len(bad_json) + len(not_object),
    }
    assert "resume_from" not in summary
    reported = [orjson.loads(line) for line in errors.read_text().splitlines()]
    by_type: dict[str, set[int]] = {}
    for error in reported:
        by_type.setdefault(error["type"], set()).add(error["line"])
    assert len(reported) == len(rejected) + len(bad_json) + len(not_object)  # each once
    assert by_type == {"json_invalid": bad_json, "not_an_object": not_object, "list_type": rejected}
    assert {tuple(e["loc"]) for e in reported if e["type"] == "list_type"} == {
        ("input", "messages")
    }
    listed = await _listed(api, "imported", len(good))
    assert sorted(r["id"] for r in listed) == sorted(f"imp-{n}" for n in good)


async def test_a_refused_key_stops_the_import_with_one_line(
    api: RunningStack, tmp_path: Path
) -> None:
    source = _write(tmp_path / "items.jsonl", [orjson.dumps(_item(n)) for n in range(1, 11)])
    code, summary, stderr = await _import(
        api.base_url, str(source), "--container", "c", key="not-a-key"
    )
    assert code == 2
    [line] = stderr.splitlines()
    assert "the key was refused (401" in line
    assert line.endswith("resume with --resume-from 1")
    assert summary["accepted"] == 0
    assert summary["resume_from"] == 1


async def test_resuming_from_a_line_registers_only_the_lines_from_there(
    api: RunningStack, tmp_path: Path
) -> None:
    source = _write(tmp_path / "items.jsonl", [orjson.dumps(_item(n)) for n in range(1, 301)])
    code, summary, _ = await _import(
        api.base_url, str(source), "--container", "resumed", "--resume-from", "201", "--batch", "30"
    )
    assert code == 0
    assert (summary["received"], summary["accepted"]) == (100, 100)
    listed = await _listed(api, "resumed", 100)
    assert sorted(r["id"] for r in listed) == sorted(f"imp-{n}" for n in range(201, 301))


async def test_sigterm_stops_an_import_whose_standard_input_stalls(api: RunningStack) -> None:
    """`producer | maniac import -` where the producer stops sending (a stalled download, a
    tail): SIGTERM stops the import at once, without waiting for the input to end."""
    proc = await asyncio.create_subprocess_exec(
        MANIAC,
        "import",
        "-",
        "--container",
        "stalled",
        "--batch",
        "2",
        "--url",
        api.base_url,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "MANIAC_API_KEY": "key-a"},
    )
    assert proc.stdin is not None
    try:
        proc.stdin.write(b"\n".join(orjson.dumps(_item(n)) for n in (1, 2, 3)) + b"\n")
        await proc.stdin.drain()
        await _listed(api, "stalled", 2)  # the first batch is in; the importer reads on
        proc.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 2, err
    summary = orjson.loads(out)
    assert (summary["accepted"], summary["resume_from"]) == (2, 3)
    assert err.decode().splitlines() == ["maniac import: interrupted; resume with --resume-from 3"]


async def test_fine_tuning_lines_are_registered_as_input_and_output(
    api: RunningStack, clickhouse: ClickHouse
) -> None:
    conversations = [
        [
            {"role": "system", "content": "You answer in one word."},
            {"role": "user", "content": f"Capital of country {n}?"},
            {"role": "assistant", "content": f"City{n}"},
        ]
        for n in range(3)
    ]
    lines = [orjson.dumps({"messages": messages}) for messages in conversations]
    lines.append(orjson.dumps({"messages": conversations[0][:2]}))  # no answer: reported
    code, summary, stderr = await _import(
        api.base_url, "-", "--container", "tuning", stdin=b"\n".join(lines)
    )
    assert code == 1
    assert (summary["accepted"], summary["rejected"], summary["bad_json"]) == (3, 1, 0)
    [error] = [orjson.loads(line) for line in stderr.splitlines()]
    assert (error["line"], error["type"]) == (4, "fine_tuning_line")

    listed = await _listed(api, "tuning", 3)
    answers = {r["choices"][0]["message"]["content"]: r for r in listed}
    assert set(answers) == {"City0", "City1", "City2"}
    rows = await clickhouse.rows(
        "SELECT completion_id, request FROM {database}.completions FINAL WHERE container = 'tuning'"
    )
    requests = {completion_id: orjson.loads(request) for completion_id, request in rows}
    for n, messages in enumerate(conversations):
        record = answers[f"City{n}"]
        assert record["choices"][0]["message"] == messages[-1]
        assert requests[record["id"]]["messages"] == messages[:-1]


async def test_a_gateway_with_smaller_limits_gets_smaller_batches_and_a_too_large_line_is_reported(
    start_stack: StackFactory, tmp_path: Path
) -> None:
    api = await start_stack(max_items_per_request=40, max_body_bytes=16 * 1024)
    lines = [orjson.dumps(_item(n)) for n in range(1, 301)]
    lines[149] = orjson.dumps(_item(150, "x" * 20_000))  # larger than a request may be
    source = _write(tmp_path / "items.jsonl", lines)
    code, summary, stderr = await _import(api.base_url, str(source), "--container", "small")
    assert code == 1
    [error] = [orjson.loads(line) for line in stderr.splitlines()]
    assert (error["line"], error["type"]) == (150, "too_large")
    assert (summary["accepted"], summary["rejected"]) == (299, 1)
    listed = await _listed(api, "small", 299)
    assert sorted(r["id"] for r in listed) == sorted(f"imp-{n}" for n in range(1, 301) if n != 150)


def _flaky_front(target: str, answers: list[int]) -> tuple[FastAPI, list[bytes]]:
    """A front for the gateway that answers its first register requests with the statuses
    ``answers`` (with ``Retry-After: 1``) and forwards the rest; the bodies it forwarded that
    were answered 200."""
    app = FastAPI()
    stored: list[bytes] = []
    failing = list(answers)

    @app.post("/v1/chat/completions/register")
    async def register(request: Request) -> Response:
        body = await request.body()
        if failing:
            return Response(b"{}", failing.pop(0), headers={"Retry-After": "1"})
        async with httpx.AsyncClient() as client:
            answer = await client.post(
                f"{target}/v1/chat/completions/register",
                content=body,
                headers={"Authorization": request.headers["Authorization"]},
            )
        if answer.status_code == 200:
            stored.append(body)
        return Response(answer.content, answer.status_code, media_type="application/json")

    return app, stored


async def test_429_503_and_5xx_are_retried_and_no_batch_answered_200_is_sent_again(
    api: RunningStack, tmp_path: Path
) -> None:
    app, stored = _flaky_front(api.base_url, [429, 503, 500, 502, 503])
    source = _write(tmp_path / "items.jsonl", [orjson.dumps(_item(n)) for n in range(1, 201)])
    async with serving(app) as front:
        code, summary, stderr = await _import(
            front, str(source), "--container", "retried", "--batch", "20", "--concurrency", "2"
        )
    assert code == 0, stderr
    assert summary["accepted"] == 200
    assert summary["requests"] == 10 + 5
    ids = [item["output"]["id"] for body in stored for item in orjson.loads(body)["items"]]
    assert sorted(ids) == sorted(f"imp-{n}" for n in range(1, 201))  # each sent once
    await _listed(api, "retried", 200)


async def test_a_server_that_does_not_answer_stops_the_import_after_retrying(
    tmp_path: Path,
) -> None:
    source = _write(tmp_path / "items.jsonl", [orjson.dumps(_item(1))])
    url = f"http://127.0.0.1:{free_port()}"
    code, summary, stderr = await _import(url, str(source), "--container", "c", "--retry-for", "1")
    assert code == 2
    [line] = stderr.splitlines()
    assert "did not take a batch within 1 s (ConnectError" in line
    assert summary["requests"] >= 2  # retried
    assert summary["resume_from"] == 1


async def test_a_missing_file_is_one_line_and_status_2(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        MANIAC,
        "import",
        str(tmp_path / "nothing.jsonl"),
        "--container",
        "c",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "MANIAC_API_KEY": "k"},
    )
    out, err = await proc.communicate()
    assert proc.returncode == 2
    assert out == b""
    assert err.decode().splitlines() == [
        f"maniac import: cannot read {tmp_path / 'nothing.jsonl'}: No such file or directory"
    ]


async def test_an_errors_file_that_cannot_be_written_is_one_line_and_status_2(
    tmp_path: Path,
) -> None:
    source = _write(tmp_path / "items.jsonl", [orjson.dumps(_item(1))])
    errors = tmp_path / "missing" / "rejected.jsonl"
    proc = await asyncio.create_subprocess_exec(
        MANIAC,
        "import",
        str(source),
        "--container",
        "c",
        "--errors",
        str(errors),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "MANIAC_API_KEY": "k"},
    )
    out, err = await proc.communicate()
    assert proc.returncode == 2  # stopped before sending anything, not "some lines rejected"
    assert out == b""
    assert err.decode().splitlines() == [
        f"maniac import: cannot write {errors}: No such file or directory"
    ]


async def test_a_200_that_is_no_register_response_stops_the_import(
    api: RunningStack, tmp_path: Path
) -> None:
    app, _ = _flaky_front(api.base_url, [200])  # a proxy's page, say
    source = _write(tmp_path / "items.jsonl", [orjson.dumps(_item(1))])
    async with serving(app) as front:
        code, summary, stderr = await _import(front, str(source), "--container", "c")
    assert code == 2
    [line] = stderr.splitlines()
    assert "the gateway answered 200 with no register response: {}" in line
    assert summary["resume_from"] == 1


@pytest.mark.parametrize(
    "errors",
    [
        [{"index": 5, "loc": ["items", 5], "message": "m", "type": "t"}],
        [{"index": -1, "loc": [], "message": "m", "type": "t"}],
        [{"loc": [], "message": "m", "type": "t"}],
        [{"index": "first", "message": "m", "type": "t"}],
    ],
    ids=["index-out-of-range", "negative-index", "no-index", "index-not-a-number"],
)
async def test_a_200_whose_errors_name_no_item_sent_stops_the_import(
    tmp_path: Path, errors: list[dict[str, Any]]
) -> None:
    app = FastAPI()

    @app.post("/v1/chat/completions/register")
    async def register() -> dict[str, Any]:
        summary = {"received": 1, "accepted": 0, "rejected": 1}
        return {"ok": False, "container": "c", "summary": summary, "errors": errors}

    source = _write(tmp_path / "items.jsonl", [orjson.dumps(_item(1))])
    async with serving(app) as front:
        code, summary, stderr = await _import(front, str(source), "--container", "c")
    assert code == 2
    [line] = stderr.splitlines()  # one line, no traceback
    assert "the gateway answered 200 with no register response" in line
    assert summary["resume_from"] == 1
