from __future__ import annotations

from services.common.ratelimit import RateLimiter


def test_fixed_window_per_key() -> None:
    limiter = RateLimiter(per_minute=2)
    t = 1_000_020.0  # 20 s into a window that started at 1_000_000 (a multiple of 60? no)
    start = t - (t % 60)
    first, second, third = (limiter.hit("a", t) for _ in range(3))
    assert (first.allowed, first.remaining) == (True, 1)
    assert (second.allowed, second.remaining) == (True, 0)
    assert not third.allowed
    assert third.reset == int(start + 60)
    assert third.retry_after == int(start + 60 - t)
    assert third.headers()["Retry-After"] == str(third.retry_after)
    assert "Retry-After" not in first.headers()
    assert limiter.hit("b", t).allowed  # another key has its own window
    assert limiter.hit("a", start + 60).allowed  # the next window starts afresh


def test_zero_means_off() -> None:
    assert not RateLimiter(per_minute=0).enabled
