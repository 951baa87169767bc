"""Circuit breaker and token bucket, on a driven clock."""

from __future__ import annotations

from streams.breaker import (
    CLOSED,
    HALF_OPEN,
    OPEN,
    CircuitBreaker,
    LocalRateLimiter,
    TokenBucket,
    backoff,
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_opens_after_n_consecutive_failures() -> None:
    clock = Clock()
    breaker = CircuitBreaker("m", failures=3, reset_after=5.0, clock=clock)
    breaker.failure()
    breaker.success()  # a success in between resets the count
    breaker.failure()
    breaker.failure()
    assert breaker.state == CLOSED and breaker.allow()
    breaker.failure()
    assert breaker.state == OPEN and breaker.opened == 1
    assert not breaker.allow()


def test_half_open_lets_exactly_one_probe_through() -> None:
    clock = Clock()
    breaker = CircuitBreaker("m", failures=1, reset_after=5.0, clock=clock)
    breaker.failure()
    clock.now += 4.9
    assert not breaker.allow()
    clock.now += 0.2
    assert breaker.state == HALF_OPEN
    assert breaker.allow()  # the probe
    assert not breaker.allow()  # everyone else waits for its verdict
    breaker.success()
    assert breaker.state == CLOSED and breaker.allow()


def test_failed_probe_opens_again_for_a_full_period() -> None:
    clock = Clock()
    breaker = CircuitBreaker("m", failures=2, reset_after=5.0, clock=clock)
    breaker.failure()
    breaker.failure()
    clock.now += 5.0
    assert breaker.allow()
    breaker.failure()  # one failure in half-open is enough
    assert breaker.state == OPEN and breaker.opened == 2
    clock.now += 4.0
    assert not breaker.allow()
    clock.now += 1.0
    assert breaker.allow()


def test_released_probe_lets_another_probe_try() -> None:
    clock = Clock()
    breaker = CircuitBreaker("m", failures=1, reset_after=1.0, clock=clock)
    breaker.failure()
    clock.now += 1.0
    assert breaker.allow()
    breaker.release()
    assert breaker.allow()


def test_backoff_is_bounded_and_grows() -> None:
    for attempt in range(1, 10):
        assert 0 <= backoff(attempt, 0.1, cap=1.0) <= min(1.0, 0.1 * 2 ** (attempt - 1))


def test_token_bucket_allows_a_burst_then_the_rate() -> None:
    bucket = TokenBucket(rate=2.0, burst=3.0)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert not bucket.take(0.4)
    assert bucket.take(0.5)  # 0.5 s at 2/s = one token
    assert not bucket.take(0.5)
    assert [bucket.take(100.0) for _ in range(4)] == [True, True, True, False]  # capped


async def test_rate_limiter_is_per_tenant_with_overrides() -> None:
    clock = Clock()
    limiter = LocalRateLimiter(1.0, 2.0, {"big": (10.0, 5.0)}, clock=clock)
    assert [await limiter.allow("a") for _ in range(3)] == [True, True, False]
    assert [await limiter.allow("b") for _ in range(2)] == [True, True]
    assert sum([await limiter.allow("big") for _ in range(10)]) == 5
    clock.now += 1.0
    assert await limiter.allow("a")
