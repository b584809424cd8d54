"""ClickHouse access: one client factory for ``http(s)://`` servers and embedded ``chdb://``.

clickhouse-connect's client is synchronous; :class:`ClickHouse` runs every call in a worker
thread so the event loop stays responsive. The same SQL runs on both back ends.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import clickhouse_connect

_JSON_INSERT_SETTINGS = {
    "input_format_json_read_objects_as_strings": 1,
    # The aggregate tables are partitioned by month; an import of old completions may span
    # more than the 100 partitions an insert may write by default, which no retry would cure.
    "max_partitions_per_insert_block": 0,
}

_DEDUPLICATE = {"insert_deduplicate": 1, "deduplicate_blocks_in_dependent_materialized_views": 1}

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


def check_identifier(name: str) -> str:
    """Database and table names are interpolated, never user input; still, refuse anything odd."""
    if not _IDENTIFIER.match(name):
        raise ValueError(f"invalid ClickHouse identifier: {name!r}")
    return name


# The characters clickhouse-connect escapes (with a backslash) in a bound string.
_ESCAPED = ("\\", "'", "`", "\t", "\n")
_ESCAPE = str.maketrans({c: "\\" + c for c in _ESCAPED})
_NEEDS_ESCAPE = re.compile("[" + re.escape("".join(_ESCAPED)) + "]")


class StringArray:
    """Strings bound as an ``Array(String)`` parameter, formatted as one literal.

    clickhouse-connect escapes a bound string one character at a time (about 3 us per id);
    the worker binds thousands of completion ids per batch. This gives the same literal, with
    the same characters escaped, in one pass when none needs escaping (the usual case) and by
    ``str.translate`` per value otherwise. clickhouse-connect binds it with ``str()``.
    """

    __slots__ = ("values",)

    def __init__(self, values: Sequence[str]) -> None:
        self.values = values

    def __str__(self) -> str:
        if not self.values:
            return "[]"
        if _NEEDS_ESCAPE.search("".join(self.values)) is None:
            return "['" + "','".join(self.values) + "']"
        return "[" + ",".join(["'" + v.translate(_ESCAPE) + "'" for v in self.values]) + "]"


@dataclass(frozen=True)
class ClickHouseTarget:
    """Where ClickHouse is: a server (``http``/``https``) or an embedded chDB directory."""

    interface: str
    database: str
    host: str = ""
    port: int = 0
    username: str = "default"
    password: str = ""
    path: Path | None = None

    @classmethod
    def parse(cls, url: str) -> ClickHouseTarget:
        parts = urlsplit(url)
        if parts.scheme == "chdb":
            raw = unquote(parts.netloc + parts.path)
            path, _, database = raw.partition("#")
            return cls(
                interface="chdb",
                path=Path(path),
                database=check_identifier(parts.fragment or database or "maniac"),
            )
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"unsupported ClickHouse URL scheme: {parts.scheme!r}")
        database = parts.path.strip("/") or "maniac"
        return cls(
            interface=parts.scheme,
            host=parts.hostname or "localhost",
            port=parts.port or (8443 if parts.scheme == "https" else 8123),
            username=unquote(parts.username or "default"),
            password=unquote(parts.password or ""),
            database=check_identifier(database),
        )

    @classmethod
    def embedded(cls, data_dir: Path, database: str = "maniac") -> ClickHouseTarget:
        return cls(
            interface="chdb",
            path=(data_dir / "clickhouse").resolve(),
            database=check_identifier(database),
        )


class EngineInUse(RuntimeError):
    """The embedded engine's directory is open in another process."""


_ENGINE_LOCKS: dict[Path, list[int]] = {}
"""Lock file -> [its descriptor, clients of this process that use the directory]."""


def lock_engine(directory: Path) -> Path:
    """Take the lock beside a chDB directory (``<directory>.lock``) for this process.

    One process at a time may open a chDB directory, and chDB tells a second one only "Error
    initializing EmbeddedServer". The lock (``flock``, released by the kernel when the holder
    exits, however it exits) names the holder's pid instead. Clients of the same process share
    it; :func:`unlock_engine` once per call.
    """
    lock = directory.with_name(directory.name + ".lock")
    held = _ENGINE_LOCKS.get(lock)
    if held is not None:
        held[1] += 1
        return lock
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise EngineInUse(
            f"The embedded ClickHouse in {directory} is open in another process (pid {holder}): "
            "one process at a time can open it. Stop that process (`maniac serve` holds it "
            "while it runs), or give this one another --data-dir."
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _ENGINE_LOCKS[lock] = [fd, 1]
    return lock


def unlock_engine(lock: Path) -> None:
    held = _ENGINE_LOCKS.get(lock)
    if held is None:
        return
    held[1] -= 1
    if held[1] == 0:
        del _ENGINE_LOCKS[lock]
        os.close(held[0])  # releases the flock


class ClickHouse:
    """Async facade over one clickhouse-connect client, bound to one database."""

    def __init__(
        self,
        client: Any,
        database: str,
        target: ClickHouseTarget | None = None,
        engine_lock: Path | None = None,
    ) -> None:
        self._client = client
        self.database = check_identifier(database)
        self._target = target
        self._engine_lock = engine_lock

    @classmethod
    def connect(cls, target: ClickHouseTarget) -> ClickHouse:
        """A client of ``target``; raises :class:`EngineInUse` when its chDB directory is
        open in another process."""
        if target.interface == "chdb":
            assert target.path is not None
            target.path.mkdir(parents=True, exist_ok=True)
            lock = lock_engine(target.path)
            try:
                client = clickhouse_connect.get_client(interface="chdb", path=str(target.path))
            except BaseException:
                unlock_engine(lock)
                raise
            return cls(client, target.database, target, engine_lock=lock)
        client = clickhouse_connect.get_client(
            interface=target.interface,
            host=target.host,
            port=target.port,
            username=target.username,
            password=target.password,
            database="default",
            autogenerate_session_id=False,
        )
        return cls(client, target.database, target)

    def with_database(self, database: str) -> ClickHouse:
        """The same connection, another database (tests give each test its own)."""
        return ClickHouse(self._client, database, self._target)

    def another_connection(self) -> ClickHouse:
        """A second client to the same ClickHouse and database.

        A client runs one call at a time (clickhouse-connect serialises them; chDB too, per
        client), so reads that share a client with the worker wait behind its inserts, which
        take hundreds of milliseconds. chDB lets one process open its directory from several
        clients, which then run side by side.
        """
        if self._target is None:
            raise RuntimeError("this client was not opened from a target")
        return ClickHouse.connect(replace(self._target, database=self.database))

    @property
    def embedded_path(self) -> Path | None:
        """The chDB directory this client opened; None for a ClickHouse server."""
        if self._target is None or self._target.interface != "chdb":
            return None
        return self._target.path

    def render(self, sql: str) -> str:
        """Replace ``{database}`` by this client's database name."""
        return sql.replace("{database}", self.database)

    async def command(self, sql: str, parameters: Mapping[str, Any] | None = None) -> Any:
        return await asyncio.to_thread(
            self._client.command, self.render(sql), parameters=dict(parameters or {})
        )

    async def rows(
        self, sql: str, parameters: Mapping[str, Any] | None = None
    ) -> Sequence[Sequence[Any]]:
        result = await asyncio.to_thread(
            self._client.query, self.render(sql), parameters=dict(parameters or {})
        )
        return result.result_rows  # type: ignore[no-any-return]

    async def json_each_row(self, sql: str, parameters: Mapping[str, Any] | None = None) -> bytes:
        """A query's result as JSONEachRow bytes (ready to insert again). Decimals are quoted,
        so that they are read, and written back, to the last digit (as JSON numbers they would
        be parsed as floats: 17 significant digits, and a Decimal(38, 12) holds up to 38)."""
        return await self._raw_query(
            sql, parameters, "JSONEachRow", {"output_format_json_quote_decimals": 1}
        )

    async def json_compact(self, sql: str, parameters: Mapping[str, Any] | None = None) -> bytes:
        """A query's result as JSONCompactEachRow bytes: a JSON array of its columns' values
        per line (ready to insert again with :meth:`insert_json_compact`)."""
        return await self._raw_query(sql, parameters, "JSONCompactEachRow")

    async def _raw_query(
        self,
        sql: str,
        parameters: Mapping[str, Any] | None,
        fmt: str,
        settings: dict[str, Any] | None = None,
    ) -> bytes:
        result = await asyncio.to_thread(
            self._client.raw_query,
            self.render(sql),
            parameters=dict(parameters or {}),
            settings=settings,
            fmt=fmt,
        )
        return bytes(result)

    async def read_row_binary(
        self,
        sql: str,
        row_bytes: int,
        consume: Callable[[bytes], None],
        parameters: Mapping[str, Any] | None = None,
        *,
        chunk_rows: int = 1 << 20,
    ) -> None:
        """Stream a query's result as RowBinary rows of ``row_bytes`` each to ``consume``, in
        chunks of whole rows (``chunk_rows`` to twice as many, the last fewer), in a worker
        thread, so a large result is never held whole on this side."""

        def read() -> None:
            stream = self._client.raw_stream(
                self.render(sql), parameters=dict(parameters or {}), fmt="RowBinary"
            )
            size = chunk_rows * row_bytes
            held = b""
            try:
                while block := stream.read(size):
                    held += block
                    whole = len(held) - len(held) % row_bytes
                    if whole >= size:
                        consume(held[:whole])
                        held = held[whole:]
                if held:
                    consume(held)
            finally:
                stream.close()

        await asyncio.to_thread(read)

    async def insert_json_each_row(self, table: str, body: bytes) -> None:
        """Bulk-insert newline-delimited JSON rows in one request.

        A JSON object given for a ``String`` column is stored as its text, exactly as written
        (so rows can carry a JSON document without encoding it a second time as a string).
        """
        await self._insert_json(table, None, body, "JSONEachRow")

    async def insert_json_compact(
        self, table: str, columns: Sequence[str], body: bytes, *, deduplicate: bool = False
    ) -> None:
        """Bulk-insert newline-delimited JSON arrays, each the values of ``columns`` in their
        order (JSONCompactEachRow), in one request; objects for ``String`` columns as in
        :meth:`insert_json_each_row`.

        ``deduplicate``: the insert carries a token made from ``body``, so that inserting the
        same body again (a retry) writes nothing into a table that already holds it, through
        views included (the tables' ``non_replicated_deduplication_window``, migration 0015).
        """
        columns = [check_identifier(column) for column in columns]
        await self._insert_json(table, columns, body, "JSONCompactEachRow", deduplicate)

    async def _insert_json(
        self,
        table: str,
        columns: list[str] | None,
        body: bytes,
        fmt: str,
        deduplicate: bool = False,
    ) -> None:
        def insert() -> None:
            settings: dict[str, Any] = _JSON_INSERT_SETTINGS
            if deduplicate:  # hashed here, in the thread: sha256 releases the GIL
                token = hashlib.sha256(body).hexdigest()
                settings = {**settings, **_DEDUPLICATE, "insert_deduplication_token": token}
            self._client.raw_insert(
                f"{self.database}.{check_identifier(table)}",
                column_names=columns,
                insert_block=body,
                settings=settings,
                fmt=fmt,
            )

        await asyncio.to_thread(insert)

    async def insert_rows(
        self, table: str, rows: Sequence[Sequence[Any]], columns: Sequence[str]
    ) -> None:
        """Insert Python rows (``bytes`` go into String columns unchanged) in one request."""
        await asyncio.to_thread(
            self._client.insert,
            f"{self.database}.{check_identifier(table)}",
            list(rows),
            column_names=list(columns),
        )

    async def ping(self) -> bool:
        try:
            await asyncio.to_thread(self._client.command, "SELECT 1")
        except Exception:
            return False
        return True

    def close(self) -> None:
        self._client.close()
        if self._engine_lock is not None:
            unlock_engine(self._engine_lock)
            self._engine_lock = None


# ClickHouse error codes that say the data is wrong, not that ClickHouse is unavailable: the same
# rows would be refused on every retry. CANNOT_PARSE_TEXT, CANNOT_PARSE_QUOTED_STRING,
# CANNOT_PARSE_INPUT_ASSERTION_FAILED, CANNOT_PARSE_DATE, CANNOT_PARSE_DATETIME, TYPE_MISMATCH,
# ARGUMENT_OUT_OF_BOUND, CANNOT_CONVERT_TYPE, CANNOT_PARSE_NUMBER, INCORRECT_DATA,
# TOO_LARGE_STRING_SIZE, VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE, DECIMAL_OVERFLOW.
DATA_ERROR_CODES = frozenset({6, 26, 27, 38, 41, 53, 69, 70, 72, 117, 131, 321, 407})
_ERROR_CODE = re.compile(r"Code: (\d+)\.")


def rejects_data(exc: BaseException) -> bool:
    """True when ClickHouse refused an insert because of what is in it (never worth a retry)."""
    found = _ERROR_CODE.search(str(exc))
    return found is not None and int(found.group(1)) in DATA_ERROR_CODES
