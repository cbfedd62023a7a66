"""Token-bucket rate limits, sans-IO: callers pass the time in.

Theory of operation.  A bucket holds at most ``burst`` tokens and refills at ``rate`` tokens per
second; a request takes one token or is refused with the seconds until one is there (the
``Retry-After`` of a 429).  Buckets live in one dict per limit keyed by anything hashable
(``(user, video, kind)``, an IP); a bucket that has refilled completely is the same as no bucket,
so ``prune`` drops those and the table stays as small as the set of recently active keys.
When the table still outgrows ``max_keys`` (a flood of distinct keys), the oldest buckets go
first: that errs towards letting a request through rather than growing without bound.

The state is per process, so limits hold *per frontend*: a client spreading its requests over
N frontends gets up to N times the rate (the README says so).  Precedent: the GCRA/token bucket
of nginx's ``limit_req`` and Envoy's local rate limit filter, which are per instance too.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Hashable


class Bucket:
    __slots__ = ("tokens", "stamp")

    def __init__(self, tokens: float, stamp: float):
        self.tokens = tokens
        self.stamp = stamp


class RateLimit:
    """One limit: ``rate`` per second with bursts of ``burst``; ``rate <= 0`` disables it."""

    def __init__(self, rate: float, burst: int, max_keys: int = 100000):
        self.rate = rate
        self.burst = max(1, burst)
        self.max_keys = max_keys
        self.buckets: OrderedDict[Hashable, Bucket] = OrderedDict()
        self._pruned_at = 0.0

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def take(self, key: Hashable, now: float) -> float:
        """Take one token for ``key``: 0.0 when allowed, else seconds until a token is there."""
        if not self.enabled:
            return 0.0
        bucket = self.buckets.get(key)
        if bucket is None:
            if len(self.buckets) >= self.max_keys:
                self.prune(now)
                while len(self.buckets) >= self.max_keys:
                    self.buckets.popitem(last=False)
            bucket = self.buckets[key] = Bucket(float(self.burst), now)
        else:
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.stamp) * self.rate)
            bucket.stamp = now
            self.buckets.move_to_end(key)
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / self.rate

    def prune(self, now: float) -> int:
        """Drop buckets that have refilled completely; returns how many went."""
        full_after = self.burst / self.rate if self.enabled else 0.0
        stale = [k for k, b in self.buckets.items() if now - b.stamp >= full_after]
        for k in stale:
            del self.buckets[k]
        self._pruned_at = now
        return len(stale)

    def maybe_prune(self, now: float, every: float = 10.0) -> None:
        if now - self._pruned_at >= every:
            self.prune(now)


class PublishLimits:
    """The publish limits of one frontend: per (user, video) for likes and for comments, and
    per client IP for every publish."""

    def __init__(self, like_rate: float, like_burst: int, comment_rate: float, comment_burst: int,
                 ip_rate: float, ip_burst: int, max_keys: int = 100000):
        self.per_user = {"like": RateLimit(like_rate, like_burst, max_keys),
                         "comment": RateLimit(comment_rate, comment_burst, max_keys)}
        self.per_ip = RateLimit(ip_rate, ip_burst, max_keys)

    def check_ip(self, ip: str, now: float) -> float:
        """Take a token of ``ip``'s bucket: 0.0, or the seconds until the client may retry."""
        self.per_ip.maybe_prune(now)
        return self.per_ip.take(ip, now)

    def check_user(self, user: str, video: str, kind: str, now: float) -> float:
        """Take a token of ``user``'s bucket for ``kind`` on ``video``.  Only for verified users:
        a self-declared name would let a client pick a fresh bucket per request."""
        limit = self.per_user[kind]
        limit.maybe_prune(now)
        return limit.take((user, video), now)
