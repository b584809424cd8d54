from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from services.common.clickhouse import (
    ClickHouseTarget,
    check_identifier,
    lock_engine,
    rejects_data,
    unlock_engine,
)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        pytest.param(
            "http://user:p%40ss@ch.internal:8123/telemetry",
            ClickHouseTarget("http", "telemetry", "ch.internal", 8123, "user", "p@ss"),
            id="http",
        ),
        pytest.param(
            "https://ch.example",
            ClickHouseTarget("https", "maniac", "ch.example", 8443, "default", ""),
            id="https-defaults",
        ),
        pytest.param(
            "chdb:///var/lib/maniac/ch",
            ClickHouseTarget("chdb", "maniac", path=Path("/var/lib/maniac/ch")),
            id="chdb",
        ),
        pytest.param(
            "chdb:///var/lib/maniac/ch#analytics",
            ClickHouseTarget("chdb", "analytics", path=Path("/var/lib/maniac/ch")),
            id="chdb-database",
        ),
    ],
)
def test_parse(url: str, expected: ClickHouseTarget) -> None:
    assert ClickHouseTarget.parse(url) == expected


@pytest.mark.parametrize("url", ["mysql://x", "http://h/bad-name;drop", "chdb:///x#a b"])
def test_parse_refuses(url: str) -> None:
    with pytest.raises(ValueError, match="ClickHouse"):
        ClickHouseTarget.parse(url)


@pytest.mark.parametrize("name", ["", "1abc", "a-b", "a;DROP", "x" * 65])
def test_identifier_refuses(name: str) -> None:
    with pytest.raises(ValueError, match="identifier"):
        check_identifier(name)


@pytest.mark.parametrize(
    ("message", "rejected"),
    [
        pytest.param("Code: 41. DB::Exception: Cannot read DateTime", True, id="bad-datetime"),
        pytest.param("Code: 72. DB::Exception: Unsigned type must not contain '-'", True, id="neg"),
        pytest.param("Code: 69. DB::Exception: Decimal value is too big", True, id="decimal"),
        pytest.param("Code: 26. DB::Exception: Cannot parse JSON string", True, id="json"),
        pytest.param("Code: 60. DB::Exception: Table x does not exist", False, id="no-table"),
        pytest.param("Code: 241. DB::Exception: Memory limit exceeded", False, id="memory"),
        pytest.param("HTTPConnectionPool: Max retries exceeded", False, id="connection"),
    ],
)
def test_only_data_errors_are_rejections(message: str, rejected: bool) -> None:
    assert rejects_data(Exception(message)) is rejected


def _lock_in_a_child(directory: Path) -> subprocess.CompletedProcess[str]:
    code = (
        "import sys; from pathlib import Path; "
        "from services.common.clickhouse import lock_engine; lock_engine(Path(sys.argv[1]))"
    )
    return subprocess.run(
        [sys.executable, "-c", code, str(directory)], capture_output=True, text=True, check=False
    )


def test_an_engine_directory_is_locked_for_this_process_until_its_last_client_closes(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "clickhouse"
    first = lock_engine(directory)
    assert lock_engine(directory) == first  # a second client of this process shares it
    assert first == tmp_path / "clickhouse.lock"
    assert first.read_text() == f"{os.getpid()}\n"

    refused = _lock_in_a_child(directory)
    assert refused.returncode != 0
    assert "EngineInUse" in refused.stderr
    assert f"is open in another process (pid {os.getpid()})" in refused.stderr

    unlock_engine(first)
    assert _lock_in_a_child(directory).returncode != 0  # one client still open
    unlock_engine(first)
    taken = _lock_in_a_child(directory)
    assert taken.returncode == 0, taken.stderr
