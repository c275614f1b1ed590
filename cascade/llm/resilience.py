"""Guards around a costly, failure-prone dependency: rate limit, circuit breaker, budget, cache.

All of them are plain objects driven from one asyncio loop: their methods never await between
checking and updating state, so no locks are needed. The clock is injectable for tests.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from enum import StrEnum
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

Clock = Callable[[], float]
K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class TokenBucket:
    """At most `rate_per_s` requests per second on average, bursts up to `capacity`.

    A caller takes a token now, or reserves the next one (the count goes negative) and sleeps
    until it is due, so waiters are served in arrival order without a lock.
    """

    def __init__(self, rate_per_s: float, capacity: int, clock: Clock = time.monotonic) -> None:
        if rate_per_s <= 0 or capacity < 1:
            raise ValueError("a token bucket needs a positive rate and a capacity of at least 1")
        self.rate_per_s = rate_per_s
        self.capacity = float(capacity)
        self._clock = clock
        self._tokens = float(capacity)
        self._updated = clock()

    def reserve(self) -> float:
        """Take a token; return the seconds to wait before using it."""
        now = self._clock()
        self._tokens = min(self.capacity, self._tokens + (now - self._updated) * self.rate_per_s)
        self._updated = now
        self._tokens -= 1.0
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate_per_s

    async def acquire(self) -> None:
        delay = self.reserve()
        if delay > 0:
            await asyncio.sleep(delay)


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Opens after `failure_threshold` consecutive failures; after `cooldown_s` lets one probe
    through (half-open): its success closes the circuit, its failure re-opens it."""

    def __init__(self, failure_threshold: int, cooldown_s: float, clock: Clock = time.monotonic) -> None:
        self.failure_threshold = failure_threshold
        self.cooldown_s = cooldown_s
        self._clock = clock
        self.state = BreakerState.CLOSED
        self.consecutive_failures = 0
        self._opened_at = 0.0
        self._probe_in_flight = False

    def refusal(self) -> str | None:
        """None if a request may go out now (taking the probe slot when half-open), else why not."""
        if self.state is BreakerState.OPEN:
            remaining = self.cooldown_s - (self._clock() - self._opened_at)
            if remaining > 0:
                return (
                    f"circuit breaker open after {self.consecutive_failures} consecutive failures; "
                    f"next probe in {remaining:.1f} s"
                )
            self.state = BreakerState.HALF_OPEN
        if self.state is BreakerState.HALF_OPEN:
            if self._probe_in_flight:
                return "circuit breaker half-open: waiting for the probe request"
            self._probe_in_flight = True
        return None

    def record_success(self) -> None:
        if self.state is not BreakerState.CLOSED:
            log.info("llm circuit breaker closed: the endpoint answered again")
        self.state = BreakerState.CLOSED
        self.consecutive_failures = 0
        self._probe_in_flight = False

    def record_failure(self) -> None:
        self.consecutive_failures += 1
        reopen = self.state is BreakerState.HALF_OPEN
        if reopen or (self.state is BreakerState.CLOSED and self.consecutive_failures >= self.failure_threshold):
            log.warning(
                "llm circuit breaker open for %.1f s after %d consecutive failures",
                self.cooldown_s,
                self.consecutive_failures,
            )
            self.state = BreakerState.OPEN
            self._opened_at = self._clock()
        self._probe_in_flight = False


class RollingBudget:
    """Caps adjudications and dollars over a rolling window; None disables a cap.

    A call is counted when it starts and its cost when it ends, so the dollar cap can be
    overshot by at most the calls already in flight.
    """

    def __init__(
        self, window_s: float, max_items: int | None, max_usd: float | None, clock: Clock = time.monotonic
    ) -> None:
        self.window_s = window_s
        self.max_items = max_items
        self.max_usd = max_usd
        self._clock = clock
        self._calls: deque[float] = deque()
        self._spend: deque[tuple[float, float]] = deque()

    def _expire(self) -> float:
        now = self._clock()
        horizon = now - self.window_s
        while self._calls and self._calls[0] <= horizon:
            self._calls.popleft()
        while self._spend and self._spend[0][0] <= horizon:
            self._spend.popleft()
        return now

    @property
    def calls(self) -> int:
        self._expire()
        return len(self._calls)

    @property
    def spent_usd(self) -> float:
        self._expire()
        return sum(usd for _, usd in self._spend)

    def refusal(self) -> str | None:
        if self.max_items is not None and self.calls >= self.max_items:
            return (
                f"llm budget exhausted: {self.calls} adjudications in the last {self.window_s:g} s "
                f"(cap {self.max_items})"
            )
        if self.max_usd is not None and self.spent_usd >= self.max_usd:
            return (
                f"llm budget exhausted: ${self.spent_usd:.4f} spent in the last {self.window_s:g} s "
                f"(cap ${self.max_usd:g})"
            )
        return None

    def record_call(self) -> None:
        self._calls.append(self._expire())

    def record_cost(self, usd: float) -> None:
        if usd > 0:
            self._spend.append((self._expire(), usd))


class LRUCache(Generic[K, V]):
    """A bounded mapping that forgets the least recently used entry; capacity 0 disables it."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        if self.capacity <= 0:
            return
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)
