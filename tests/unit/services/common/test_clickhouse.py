from __future__ import annotations

from pathlib import Path

import pytest

from services.common.clickhouse import ClickHouseTarget, check_identifier, rejects_data


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
