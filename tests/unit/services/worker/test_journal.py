"""The journal of inserts under way, on its own (the worker's use of it is tested in
tests/integration/services/worker/test_journal.py)."""

from __future__ import annotations

import contextlib
import errno
import resource
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.worker.journal import InsertJournal


@contextlib.contextmanager
def files_limited_to(size: int) -> Iterator[None]:
    """No file of this process may grow past ``size`` bytes: a write past it fails (EFBIG)
    as one on a full disk does (ENOSPC), after writing what fitted."""
    ignored = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, ignored)


def test_a_body_that_cannot_be_written_whole_leaves_nothing_behind(tmp_path: Path) -> None:
    """The worker retries an insert whose entry could not be written (a full disk): each
    attempt's part-written file would stay, and keep the space it took, until the next start."""
    journal = InsertJournal(tmp_path / "inserts")
    for _ in range(3):
        with files_limited_to(4096), pytest.raises(OSError, match="too large") as refused:
            journal.begin(b"x" * 100_000)
        assert refused.value.errno == errno.EFBIG
    assert list(journal.directory.iterdir()) == []
    entry = journal.begin(b"rows")  # once there is room again
    assert journal.unfinished() == [entry]
    assert entry.read_bytes() == b"rows"
