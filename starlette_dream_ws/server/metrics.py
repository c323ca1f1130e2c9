"""Counters of one app, cheap enough to bump on every message, and their Prometheus text.

Plain integers rather than a metrics library: the hot paths only add one, and the text is
built when someone scrapes `<mount>/metrics` (enabled with the `metrics` setting).
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterator

from ..groups.publishing import Histogram, PublishMetrics


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


def exposition(
    connections: ConnectionMetrics,
    publishing: PublishMetrics,
    *,
    open_connections: int,
    backend_connected: bool,
    backend_reconnects: int,
) -> str:
    """The Prometheus text format (version 0.0.4) of an app's figures."""
    out: list[str] = []

    def metric(name: str, kind: str, help_text: str, *lines: str) -> None:
        out.extend((f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *lines))

    metric(
        "dream_ws_connections_open",
        "gauge",
        "Open WebSocket connections.",
        f"dream_ws_connections_open {open_connections}",
    )
    metric(
        "dream_ws_connections_accepted_total",
        "counter",
        "Connections that completed the handshake.",
        f"dream_ws_connections_accepted_total {connections.accepted}",
    )
    metric(
        "dream_ws_connections_closed_total",
        "counter",
        "Ended connections by close code.",
        *(f'dream_ws_connections_closed_total{{code="{code}"}} {n}' for code, n in sorted(connections.closed.items())),
    )
    metric(
        "dream_ws_slow_closed_total",
        "counter",
        "Connections closed with 1013 because their outgoing buffer overflowed.",
        f"dream_ws_slow_closed_total {connections.slow_closed}",
    )
    metric(
        "dream_ws_dropped_total",
        "counter",
        "Connections dropped because the client did not take their close in time.",
        f"dream_ws_dropped_total {connections.dropped}",
    )
    metric(
        "dream_ws_messages_received_total",
        "counter",
        "Frames received from clients.",
        f"dream_ws_messages_received_total {connections.messages_in}",
    )
    metric(
        "dream_ws_messages_sent_total",
        "counter",
        "Frames sent to clients.",
        f"dream_ws_messages_sent_total {connections.messages_out}",
    )
    metric(
        "dream_ws_backend_connected",
        "gauge",
        "1 when the groups backend is connected.",
        f"dream_ws_backend_connected {int(backend_connected)}",
    )
    metric(
        "dream_ws_backend_reconnects_total",
        "counter",
        "Times the groups backend connection was re-established.",
        f"dream_ws_backend_reconnects_total {backend_reconnects}",
    )
    metric(
        "dream_ws_publishes_total",
        "counter",
        "Messages published by this process.",
        f"dream_ws_publishes_total {publishing.published}",
    )
    metric(
        "dream_ws_publish_retries_total",
        "counter",
        "Publish attempts retried after a failure.",
        f"dream_ws_publish_retries_total {publishing.retries}",
    )
    metric(
        "dream_ws_publish_failures_total",
        "counter",
        "Publishes that failed after every retry.",
        f"dream_ws_publish_failures_total {publishing.failures}",
    )
    metric(
        "dream_ws_publish_duration_seconds",
        "histogram",
        "Time from a publish call to its confirmation, retries included.",
        *histogram_lines("dream_ws_publish_duration_seconds", publishing.seconds),
    )
    return "\n".join(out) + "\n"


def _number(value: float) -> str:
    return repr(float(value))


def histogram_lines(name: str, histogram: Histogram) -> Iterator[str]:
    total = 0
    for bound, count in zip((*map(_number, histogram.buckets), "+Inf"), histogram.counts, strict=True):
        total += count
        yield f'{name}_bucket{{le="{bound}"}} {total}'
    yield f"{name}_sum {_number(histogram.sum)}"
    yield f"{name}_count {histogram.count}"
