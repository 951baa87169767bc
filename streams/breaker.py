"""Keeping a dead or slow model endpoint from taking the service down.

- ``CircuitBreaker`` per endpoint: after ``failures`` consecutive failures it opens and
  calls are refused at once (no partition waits on a dead endpoint); after
  ``reset_after`` seconds one probe call is let through (half-open); its success closes
  the breaker, its failure opens it again.
- ``backoff`` delays for bounded retries, with jitter so workers do not retry in step.
- ``TokenBucket`` / ``LocalRateLimiter``: a per-tenant budget of LLM calls. The
  ``RateLimiter`` protocol lets a worker use a shared one (Redis, in ``connectors``)
  so several workers enforce one limit.

The clock is injected, so tests drive time instead of sleeping.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

Clock = Callable[[], float]

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


class CircuitBreaker:
    def __init__(
        self,
        name: str,
        failures: int = 3,
        reset_after: float = 10.0,
        clock: Clock = time.monotonic,
    ) -> None:
        self.name = name
        self._threshold = max(1, failures)
        self._reset_after = reset_after
        self._clock = clock
        self._state = CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probing = False
        self.opened = 0  # how many times it opened (metrics, tests)

    @property
    def state(self) -> str:
        if self._state == OPEN and self._clock() - self._opened_at >= self._reset_after:
            return HALF_OPEN
        return self._state

    def allow(self) -> bool:
        """May a call go to this endpoint now? In half-open state exactly one caller
        (the probe) gets True until it reports back."""
        state = self.state
        if state == CLOSED:
            return True
        if state == HALF_OPEN and not self._probing:
            self._state = HALF_OPEN
            self._probing = True
            return True
        return False

    def success(self) -> None:
        self._state = CLOSED
        self._failures = 0
        self._probing = False

    def failure(self) -> None:
        self._failures += 1
        if self._state == HALF_OPEN or self._failures >= self._threshold:
            if self._state != OPEN:
                self.opened += 1
            self._state = OPEN
            self._opened_at = self._clock()
            self._probing = False

    def release(self) -> None:
        """A probe that ended without a verdict (cancelled): let another probe try."""
        self._probing = False


def backoff(attempt: int, base: float, cap: float = 2.0) -> float:
    """Delay before retry ``attempt`` (1-based): exponential with full jitter."""
    return random.uniform(0, min(cap, base * 2 ** (attempt - 1)))


@dataclass(slots=True)
class TokenBucket:
    rate: float  # tokens per second
    burst: float  # bucket size
    tokens: float = -1.0
    updated: float = 0.0

    def take(self, now: float, cost: float = 1.0) -> bool:
        if self.tokens < 0:
            self.tokens, self.updated = self.burst, now
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= cost:
            self.tokens -= cost
            return True
        return False


class RateLimiter(Protocol):
    async def allow(self, tenant_id: str) -> bool: ...


class LocalRateLimiter:
    """One token bucket per tenant in this process."""

    def __init__(
        self,
        rate: float,
        burst: float,
        overrides: dict[str, tuple[float, float]] | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self._default = (rate, burst)
        self._overrides = overrides or {}
        self._clock = clock
        self._buckets: dict[str, TokenBucket] = {}

    async def allow(self, tenant_id: str) -> bool:
        bucket = self._buckets.get(tenant_id)
        if bucket is None:
            rate, burst = self._overrides.get(tenant_id, self._default)
            bucket = self._buckets[tenant_id] = TokenBucket(rate, burst)
        return bucket.take(self._clock())
