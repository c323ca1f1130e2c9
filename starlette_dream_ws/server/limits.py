"""Per-connection and per-app limits: message rate, connection counts, allowed origins."""

from __future__ import annotations

import time
from collections.abc import Sequence
from urllib.parse import urlsplit


class RateLimiter:
    """A token bucket: `rate` messages per second on average, bursts of up to `burst`.

    `take()` says whether a message may be handled now. Messages over the limit are dropped;
    `strikes` counts the drops since the client last stayed under the limit.
    """

    __slots__ = ("_stamp", "_tokens", "burst", "rate", "strikes")

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self.strikes = 0
        self._tokens = float(burst)
        self._stamp = time.monotonic()

    def take(self, now: float | None = None) -> bool:
        """`now`: monotonic time, if the caller has it already."""
        if now is None:
            now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if self._tokens >= 1:
            self._tokens -= 1
            self.strikes = 0
            return True
        self.strikes += 1
        return False


def origin_allowed(origin: str | None, host: str | None, allowed: Sequence[str]) -> bool:
    """May a handshake with this `Origin` header proceed?

    No `Origin` (not a browser) is allowed: the check is against cross-site pages, which
    browsers always label. With an empty allowlist only the page's own host may connect; `*`
    allows every origin; otherwise the origin must be listed exactly (scheme, host and port).
    """
    if origin is None:
        return True
    if "*" in allowed:
        return True
    if origin in allowed:
        return True
    if not allowed:
        try:
            netloc = urlsplit(origin).netloc
        except ValueError:  # e.g. "http://[::1": not an origin a browser sends
            return False
        return host is not None and netloc.lower() == host.lower()
    return False
