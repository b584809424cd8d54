"""Where the worker resumes after the embedded broker on durable storage crashed."""

from __future__ import annotations

import pytest

from services.stack import resume_after_crash


@pytest.mark.parametrize(
    ("stored", "acked", "kept", "start_at", "lost"),
    [
        # the broker kept everything: resume where storing had reached
        ({0: 50}, {0: 59}, {0: 60}, {0: 50}, 0),
        # it came back behind what was stored: resume where it numbers the next records
        ({0: 86_200}, {0: 86_299}, {0: 400}, {0: 400}, 100),
        # behind what was acknowledged, ahead of what was stored: the rest is gone
        ({0: 50}, {0: 79}, {0: 70}, {0: 50}, 10),
        # nothing stored nor fetched from a partition: its records past the watermark are gone
        ({}, {0: 9}, {0: 5}, {}, 5),
        # two partitions, one intact
        ({0: 10, 1: 20}, {0: 14, 1: 24}, {0: 15, 1: 0}, {0: 10, 1: 0}, 5),
    ],
)
def test_resume_after_crash(
    stored: dict[int, int],
    acked: dict[int, int],
    kept: dict[int, int],
    start_at: dict[int, int],
    lost: int,
) -> None:
    assert resume_after_crash(stored, acked, kept) == (start_at, lost)
