"""Per-client token-bucket rate limiting, independent of the transport.

Each client key (an API-key fingerprint, or a peer address) owns a bucket of
`burst` tokens refilled at `rate` per second; a request takes one token or is
refused with RateLimited (RESOURCE_EXHAUSTED / HTTP 429) carrying the time
until a token is back. Memory is bounded: at most `max_clients` buckets are
kept, least recently used evicted first (an evicted client starts full again,
which errs on the side of letting it in).
"""

from __future__ import annotations

import collections
import threading
import time
from typing import TYPE_CHECKING

from .errors import RateLimited

if TYPE_CHECKING:
    from .config import Settings


class RateLimiter:
    def __init__(self, rate: float, burst: int, *, max_clients: int = 10_000, clock=time.monotonic) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self._max_clients = max_clients
        self._clock = clock
        self._lock = threading.Lock()
        # key -> (tokens, time of last refill)
        self._buckets: collections.OrderedDict[str, tuple[float, float]] = collections.OrderedDict()

    def try_acquire(self, key: str) -> float:
        """Take a token for `key`: 0.0 if granted, else the seconds until one is available."""
        now = self._clock()
        with self._lock:
            tokens, last = self._buckets.pop(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                tokens -= 1.0
                wait = 0.0
            else:
                wait = (1.0 - tokens) / self.rate
            self._buckets[key] = (tokens, now)
            while len(self._buckets) > self._max_clients:
                self._buckets.popitem(last=False)
        return wait

    def check(self, key: str) -> None:
        wait = self.try_acquire(key)
        if wait > 0:
            raise RateLimited(f"rate limit exceeded ({self.rate:g} requests/s, burst {self.burst}); retry later", wait)

    def __len__(self) -> int:
        return len(self._buckets)


def grpc_peer_key(peer: str) -> str:
    """A client's bucket key from its gRPC peer: 'ipv4:10.0.0.7:51234' ->
    'ipv4:10.0.0.7'; 'ipv6:[::1]:5' -> 'ipv6:[::1]'; other forms (unix
    sockets) are kept whole."""
    kind, _, address = peer.partition(":")
    if kind in ("ipv4", "ipv6") and ":" in address:
        return f"{kind}:{address.rsplit(':', 1)[0]}"
    return peer


def http_peer_key(address: str) -> str:
    """A client's bucket key from its HTTP client address, in the form
    grpc_peer_key() gives, so one client has one bucket on both transports."""
    return f"ipv6:[{address}]" if ":" in address else f"ipv4:{address}"


def limiter_from_settings(settings: Settings) -> RateLimiter | None:
    """The per-client limiter the settings ask for (None when off). One
    instance is shared by every transport, so gRPC and HTTP calls of one
    client draw from the same bucket."""
    if settings.rate_limit_per_second <= 0:
        return None
    return RateLimiter(settings.rate_limit_per_second, settings.rate_limit_burst)
