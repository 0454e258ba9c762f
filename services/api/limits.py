"""Request rate limits, per API process: token buckets keyed by API key and, for failed
authentication, by client address.

- Each key may make ``rate_limit_burst`` requests at once and ``rate_limit_per_minute`` on
  average; past that it answers 429 with ``Retry-After`` (the seconds until one more is allowed).
- Failed authentication costs a token of the client address's failure bucket
  (``auth_failure_burst``, refilled at ``auth_failures_per_minute``); while it is empty every
  authentication from that address answers 429 before any key is checked, so guessing a key's
  secret is slowed to that rate.

The buckets live in this process: with N API processes behind a balancer the limits are N times
these (a shared store such as Redis would make them global; not built).
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cotune.settings import Settings


@dataclass
class _Bucket:
    tokens: float
    updated: float


class TokenBuckets:
    """``take(key)``: None when allowed, else the seconds to wait. Thread-safe; forgets buckets
    that refilled completely, so memory stays bounded by the active keys."""

    def __init__(
        self, burst: int, per_minute: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.burst = float(burst)
        self.rate = per_minute / 60.0
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, _Bucket] = {}

    def _refilled(self, key: str, now: float) -> _Bucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            return _Bucket(self.burst, now)
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate)
        bucket.updated = now
        return bucket

    def take(self, key: str) -> float | None:
        with self._lock:
            now = self._now()
            bucket = self._refilled(key, now)
            if bucket.tokens < 1.0:
                self._buckets[key] = bucket
                return (1.0 - bucket.tokens) / self.rate
            bucket.tokens -= 1.0
            self._buckets[key] = bucket
            if len(self._buckets) > 10_000:
                self._forget_full(now)
            return None

    def wait(self, key: str) -> float | None:
        """Like ``take`` without taking: the seconds until a token, None if one is there."""
        with self._lock:
            bucket = self._buckets.get(key)
            if bucket is None:
                return None
            bucket = self._refilled(key, self._now())
            return None if bucket.tokens >= 1.0 else (1.0 - bucket.tokens) / self.rate

    def _now(self) -> float:
        return self._clock()

    def _forget_full(self, now: float) -> None:
        for key in [
            k for k, b in self._buckets.items() if self._refilled(k, now).tokens >= self.burst
        ]:
            del self._buckets[key]


def retry_after(seconds: float) -> str:
    """A ``Retry-After`` value: whole seconds, at least 1."""
    return str(max(1, math.ceil(seconds)))


def key_fingerprint(key: str) -> str:
    """A bucket name for an API key that is not the key."""
    return hashlib.sha256(key.encode("utf-8", "replace")).hexdigest()[:24]


class RateLimits:
    """The API's two limiters: requests per key, failed authentications per address."""

    def __init__(self, requests: TokenBuckets, auth_failures: TokenBuckets) -> None:
        self.requests, self.auth_failures = requests, auth_failures

    @classmethod
    def from_settings(cls, settings: Settings) -> RateLimits:
        return cls(
            TokenBuckets(settings.rate_limit_burst, settings.rate_limit_per_minute),
            TokenBuckets(settings.auth_failure_burst, settings.auth_failures_per_minute),
        )
