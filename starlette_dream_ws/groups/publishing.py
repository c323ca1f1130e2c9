"""Publishing that never fails silently: attempts with a timeout, jittered backoff, then an error.

Shared by the groups layer (async producers, endpoints, consumers) and the sync producers.
"""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from ..settings import Settings

logger = logging.getLogger("starlette_dream_ws.layer")

T = TypeVar("T")

# Retrying cannot mend these: they are bugs or bad arguments, raised at once.
PROGRAMMING_ERRORS = (TypeError, ValueError, KeyError, AttributeError, AssertionError, NotImplementedError)

#: Upper bounds (seconds) of the publish latency histogram's buckets.
PUBLISH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class BackendUnavailable(ConnectionError):
    """The groups backend cannot be reached right now."""


class PublishError(ConnectionError):
    """A message could not be published after every retry; nothing was delivered."""


class Histogram:
    """Counts of observations per bucket, as a Prometheus histogram (cumulative on output)."""

    def __init__(self, buckets: Sequence[float] = PUBLISH_BUCKETS) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1


@dataclasses.dataclass
class PublishMetrics:
    """What a publisher counts (in the process that publishes)."""

    published: int = 0
    retries: int = 0
    failures: int = 0
    seconds: Histogram = dataclasses.field(default_factory=Histogram)

    def failed(self, group: str) -> None:
        self.failures += 1
        logger.error("publish_failed group=%s", group, extra={"dream_ws": {"event": "publish_failed", "group": group}})

    def retrying(self, what: str, error: BaseException, attempt: int, attempts: int, delay: float) -> None:
        self.retries += 1
        logger.warning(
            "%s failed (%s), attempt %d of %d; retrying in %.2fs",
            what,
            type(error).__name__,
            attempt,
            attempts,
            delay,
            extra={
                "dream_ws": {"event": "publish_retry", "what": what, "error": type(error).__name__, "attempt": attempt}
            },
        )


async def retrying(
    operation: Callable[[], Awaitable[T]], settings: Settings, metrics: PublishMetrics, *, what: str
) -> T:
    """Run `operation` with a timeout per attempt and bounded, jittered exponential backoff;
    `PublishError` once every attempt has failed."""
    delay = settings.publish_backoff
    attempts = settings.publish_retries + 1
    for attempt in range(1, attempts + 1):
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation
            # that arrives as the operation finishes, and the caller would never stop.
            async with asyncio.timeout(settings.publish_timeout):
                return await operation()
        except PROGRAMMING_ERRORS:
            raise
        except Exception as exc:
            if attempt == attempts:
                raise PublishError(f"{what} failed after {attempts} attempts: {type(exc).__name__}") from exc
            metrics.retrying(what, exc, attempt, attempts, delay)
        await asyncio.sleep(delay * random.uniform(0.8, 1.2))
        delay = min(delay * 2, settings.publish_backoff_max)
    raise AssertionError("unreachable")


def retrying_blocking(operation: Callable[[], T], settings: Settings, metrics: PublishMetrics, *, what: str) -> T:
    """`retrying` for sync code: the same attempts, backoff and `PublishError`, with the time of
    each attempt bounded by the client's socket timeouts (`publish_timeout`)."""
    delay = settings.publish_backoff
    attempts = settings.publish_retries + 1
    for attempt in range(1, attempts + 1):
        try:
            return operation()
        except PROGRAMMING_ERRORS:
            raise
        except Exception as exc:
            if attempt == attempts:
                raise PublishError(f"{what} failed after {attempts} attempts: {type(exc).__name__}") from exc
            metrics.retrying(what, exc, attempt, attempts, delay)
        time.sleep(delay * random.uniform(0.8, 1.2))
        delay = min(delay * 2, settings.publish_backoff_max)
    raise AssertionError("unreachable")
