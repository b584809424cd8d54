"""Inserts under way, kept on disk beside an embedded ClickHouse until each is done.

An insert reaches ``completions`` and the tables its views fill one after the other (the
list's index, its totals, ``usage_hourly``, then ``usage_daily``), not in one transaction. The
embedded ClickHouse runs in the worker's process, so a process killed in the middle of an
insert (``kill -9``, the OOM killer, a power cut) leaves the tables written first holding the
batch and the others without it: the list or the aggregates then disagree with ``completions``
for good, since the batch's records, fetched again (or not: on memory storage they are gone),
are found stored and dropped by the deduplication.

So each insert's body is written here before the insert starts and removed once it succeeded
(or was given up: its records are fetched again). A worker starting on the same ClickHouse
inserts what it finds here again, before anything else: the same body carries the same
deduplication token (migration 0015), so every table that holds it already drops it, and those
the process did not reach get it (and ``completions``, should it have kept the token of a part
it lost, gets the rows again: see :func:`services.worker.runner.insert_unfinished`). Only the
embedded engine needs this; a ClickHouse server
goes on with an insert whose body it received, whatever becomes of the worker.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import structlog

from services.common.clickhouse import ClickHouse, rejects_data

log = structlog.get_logger(__name__)

SUFFIX = ".rows"


class InsertJournal:
    """One file per insert under way in ``directory``, named at random, holding its body."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @classmethod
    def of(cls, clickhouse: ClickHouse) -> InsertJournal | None:
        """The journal of an embedded ClickHouse's database (``<engine dir>.inserts/<db>``);
        None for a ClickHouse server."""
        path = clickhouse.embedded_path
        if path is None:
            return None
        return cls(path.with_name(path.name + ".inserts") / clickhouse.database)

    def begin(self, body: bytes) -> Path:
        """Keep ``body`` until :meth:`end`; written whole (then renamed) or not at all."""
        self.directory.mkdir(parents=True, exist_ok=True)
        entry = self.directory / f"{uuid.uuid4().hex}{SUFFIX}"
        partial = entry.with_suffix(".partial")
        try:
            partial.write_bytes(body)
            os.replace(partial, entry)
        except BaseException:  # a full disk, say: what was written must not stay and fill it
            partial.unlink(missing_ok=True)
            raise
        return entry

    @staticmethod
    def end(entry: Path) -> None:
        entry.unlink(missing_ok=True)

    def unfinished(self) -> list[Path]:
        """The inserts begun and never ended, oldest first; bodies cut short by a crash while
        they were written (never inserted) are removed."""
        if not self.directory.is_dir():
            return []
        for partial in self.directory.glob("*.partial"):
            partial.unlink(missing_ok=True)
        entries = list(self.directory.glob(f"*{SUFFIX}"))
        return sorted(entries, key=lambda entry: entry.stat().st_mtime_ns)

    async def finish(self, insert: Callable[[bytes], Awaitable[None]]) -> None:
        """Insert each unfinished body again with ``insert``, oldest first, and end it: the
        tables that hold it drop it (the same body carries the same deduplication token), the
        others get it. One ClickHouse refuses for its data is ended, said in the log."""
        for entry in self.unfinished():
            body = entry.read_bytes()
            try:
                await insert(body)
            except Exception as exc:
                if not rejects_data(exc):
                    raise
                log.error("unfinished_insert_refused", entry=entry.name, error=repr(exc))
            else:
                log.warning("unfinished_insert_finished", entry=entry.name, bytes=len(body))
            self.end(entry)
