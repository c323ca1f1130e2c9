"""Counters of one app, cheap enough to bump on every message, and their Prometheus text.

Plain integers rather than a metrics library: the hot paths only add one, and the figures are
read when someone scrapes `<mount>/metrics` (enabled with the `metrics` setting). A scrape
describes every metric once (`families`); prometheus-client renders that description when the
`prometheus` extra is installed (`prometheus.py`), `exposition` writes it by hand otherwise.
"""

from __future__ import annotations

import collections
import dataclasses
import hmac
import itertools
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Literal, NamedTuple

from ..groups.publishing import Histogram, PublishMetrics

if TYPE_CHECKING:
    from .prometheus import DreamWsCollector

#: Both renderings write only names valid in the classic format, so either is this version.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: The publish latency histogram: its name and help.
PUBLISH_DURATION = (
    "dream_ws_publish_duration_seconds",
    "Time from a publish call to its confirmation, retries included.",
)


@dataclasses.dataclass
class ConnectionMetrics:
    """What the consumers of one app count."""

    #: Connections that completed the handshake.
    accepted: int = 0
    #: Ended connections by close code (refused handshakes included).
    closed: collections.Counter[int] = dataclasses.field(default_factory=collections.Counter)
    #: Frames received from clients and sent to them.
    messages_in: int = 0
    messages_out: int = 0
    #: Connections closed with 1013 because their outgoing buffer overflowed.
    slow_closed: int = 0
    #: Connections given up because the client did not take their close within `close_timeout`.
    dropped: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class Figures:
    """What one scrape reads from an app."""

    connections: ConnectionMetrics
    publishing: PublishMetrics
    open_connections: int
    backend_connected: bool
    backend_reconnects: int


#: Reads an app's figures now; None once the app is gone.
FiguresSource = Callable[[], Figures | None]


class Family(NamedTuple):
    """A counter or a gauge and its samples, as (label values, value) pairs."""

    #: As exposed: a counter's name ends in `_total`.
    name: str
    kind: Literal["counter", "gauge"]
    help: str
    samples: tuple[tuple[tuple[str, ...], float], ...]
    labels: tuple[str, ...] = ()


def _counter(name: str, help_text: str, value: float) -> Family:
    return Family(name, "counter", help_text, (((), value),))


def _gauge(name: str, help_text: str, value: float) -> Family:
    return Family(name, "gauge", help_text, (((), value),))


def families(figures: Figures) -> list[Family]:
    """Every counter and gauge of an app (the histogram is `PUBLISH_DURATION`)."""
    conn, pub = figures.connections, figures.publishing
    # `sorted` copies the close codes in one C call: a collector registered in the process's
    # own registry may be scraped from prometheus-client's server thread while codes are added.
    closed = tuple(((str(code),), n) for code, n in sorted(conn.closed.items()))
    return [
        _gauge("dream_ws_connections_open", "Open WebSocket connections.", figures.open_connections),
        _counter("dream_ws_connections_accepted_total", "Connections that completed the handshake.", conn.accepted),
        Family("dream_ws_connections_closed_total", "counter", "Ended connections by close code.", closed, ("code",)),
        _counter(
            "dream_ws_slow_closed_total",
            "Connections closed with 1013 because their outgoing buffer overflowed.",
            conn.slow_closed,
        ),
        _counter(
            "dream_ws_dropped_total",
            "Connections dropped because the client did not take their close in time.",
            conn.dropped,
        ),
        _counter("dream_ws_messages_received_total", "Frames received from clients.", conn.messages_in),
        _counter("dream_ws_messages_sent_total", "Frames sent to clients.", conn.messages_out),
        _gauge("dream_ws_backend_connected", "1 when the groups backend is connected.", int(figures.backend_connected)),
        _counter(
            "dream_ws_backend_reconnects_total",
            "Times the groups backend connection was re-established.",
            figures.backend_reconnects,
        ),
        _counter("dream_ws_publishes_total", "Messages published by this process.", pub.published),
        _counter("dream_ws_publish_retries_total", "Publish attempts retried after a failure.", pub.retries),
        _counter("dream_ws_publish_failures_total", "Publishes that failed after every retry.", pub.failures),
    ]


def exposition(figures: Figures) -> str:
    """The Prometheus text format (version 0.0.4) of an app's figures, written by hand."""
    out: list[str] = []
    for name, kind, help_text, samples, labels in families(figures):
        out += (f"# HELP {name} {help_text}", f"# TYPE {name} {kind}")
        out += (f"{name}{_labels(labels, values) if labels else ''} {value}" for values, value in samples)
    name, help_text = PUBLISH_DURATION
    out += (f"# HELP {name} {help_text}", f"# TYPE {name} histogram")
    out += histogram_lines(name, figures.publishing.seconds)
    return "\n".join(out) + "\n"


def _labels(names: tuple[str, ...], values: tuple[str, ...]) -> str:
    escaped = (v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"') for v in values)
    return "{" + ",".join(f'{n}="{v}"' for n, v in zip(names, escaped, strict=True)) + "}"


def _number(value: float) -> str:
    return repr(float(value))


def cumulative_buckets(histogram: Histogram) -> list[tuple[str, int]]:
    """(upper bound as the `le` label, observations up to it), ending with `+Inf`."""
    bounds = (*map(_number, histogram.buckets), "+Inf")
    return list(zip(bounds, itertools.accumulate(histogram.counts), strict=True))


def histogram_lines(name: str, histogram: Histogram) -> Iterator[str]:
    for bound, total in cumulative_buckets(histogram):
        yield f'{name}_bucket{{le="{bound}"}} {total}'
    yield f"{name}_sum {_number(histogram.sum)}"
    yield f"{name}_count {histogram.count}"


def scrape_allowed(token: str | None, authorization: str | None) -> bool:
    """Whether a request with this `Authorization` header may read the metrics.

    No token configured: anyone who reaches the endpoint may (keep it off public routes).
    """
    if token is None:
        return True
    scheme, _, credentials = (authorization or "").partition(" ")
    credentials = credentials.strip()
    if scheme.lower() != "bearer" or not credentials:
        return False
    # Constant time, so the token cannot be guessed byte by byte from response times; bytes,
    # because compare_digest refuses str with characters outside ASCII.
    return hmac.compare_digest(credentials.encode(), token.encode())


class Exposition:
    """The metrics of one app: through prometheus-client when it is installed, else by hand."""

    def __init__(self, figures: FiguresSource) -> None:
        self.figures = figures
        self._collector: DreamWsCollector | None = None
        self._render: Callable[[], str] | None = None

    def collector(self) -> DreamWsCollector:
        """A prometheus-client collector reading this app's figures at each scrape.

        Raises `ImportError` without the `prometheus` extra.
        """
        if self._collector is None:
            try:
                from .prometheus import DreamWsCollector
            except ImportError as exc:
                raise ImportError(
                    "prometheus-client is not installed: pip install 'starlette-dream-ws[prometheus]'"
                ) from exc
            self._collector = DreamWsCollector(self.figures)
        return self._collector

    def text(self) -> str:
        """The Prometheus text format of the figures now."""
        if self._render is None:
            self._render = self._renderer()
        return self._render()

    def _renderer(self) -> Callable[[], str]:
        try:
            from .prometheus import private_registry, render
        except ImportError:
            # The `prometheus` extra is optional: without it, the same families written by hand.
            return self._by_hand
        registry = private_registry(self.collector())
        return lambda: render(registry)

    def _by_hand(self) -> str:
        figures = self.figures()
        return "" if figures is None else exposition(figures)
