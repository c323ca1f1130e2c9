"""Prometheus metrics: off by default, and when on, figures that follow what really happened."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from starlette_dream_ws import DreamImagesConsumer, DreamWebSocketApp, asend_image_update
from starlette_dream_ws.groups import PublishError
from starlette_dream_ws.groups.publishing import Histogram
from starlette_dream_ws.server.metrics import histogram_lines
from starlette_dream_ws.testing import ConsumerTestClient

MakeApp = Callable[..., DreamWebSocketApp]

pytestmark = pytest.mark.anyio


def samples(text: str) -> dict[str, float]:
    """`name{labels}` -> value of every sample line of an exposition."""
    found: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            found[name] = float(value)
    return found


async def test_the_endpoint_is_off_unless_enabled(make_app: MakeApp) -> None:
    async with ConsumerTestClient(make_app()) as client:
        response = await client.http.get("/metrics")
    assert response.status_code == 404


async def test_counts_follow_connections_messages_and_closes(make_app: MakeApp) -> None:
    app = make_app(metrics=True)
    async with ConsumerTestClient(app) as client:
        async with client.connect("/dreams/5") as ws:
            assert (await ws.receive_json())["type"] == "connection_established"
            for n in range(3):
                await ws.send_json({"type": "ping", "timestamp": n})
                assert (await ws.receive_json())["type"] == "pong"
            await asend_image_update(5, status="completed")
            assert (await ws.receive_json())["type"] == "image_update"
            during = samples((await client.http.get("/metrics")).text)
        async with client.connect("/dreams/5", user=None) as refused:
            code, _ = await refused.expect_close()
        response = await client.http.get("/metrics")
    assert code == 4401
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    after = samples(response.text)
    assert during["dream_ws_connections_open"] == 1
    assert after["dream_ws_connections_open"] == 0
    assert after["dream_ws_connections_accepted_total"] == 1  # the refused one never completed
    assert after["dream_ws_messages_received_total"] == 3
    # greeting + 3 pongs + 1 update, then the refused one's error frame
    assert during["dream_ws_messages_sent_total"] == 5
    assert after['dream_ws_connections_closed_total{code="4401"}'] == 1
    assert after['dream_ws_connections_closed_total{code="1000"}'] == 1
    assert after["dream_ws_publishes_total"] == 1
    assert after['dream_ws_publish_duration_seconds_bucket{le="+Inf"}'] == 1
    assert after["dream_ws_publish_duration_seconds_count"] == 1
    assert after["dream_ws_backend_connected"] == 1
    assert after["dream_ws_slow_closed_total"] == 0


class StuckConsumer(DreamImagesConsumer):
    """Its handler waits on a gate, as a send to a client that does not read would."""

    gate = asyncio.Event()
    #: Set once a send is stuck on the gate.
    stuck = asyncio.Event()

    async def image_update(self, event: dict[str, Any]) -> None:
        self.stuck.set()
        await self.gate.wait()
        await super().image_update(event)


async def test_a_client_over_its_buffer_is_counted_as_slow(make_app: MakeApp) -> None:
    StuckConsumer.gate, StuckConsumer.stuck = asyncio.Event(), asyncio.Event()
    app = make_app(metrics=True, max_pending_events=2, consumer=StuckConsumer)
    async with ConsumerTestClient(app) as client:
        async with client.connect("/dreams/5") as ws:
            assert (await ws.receive_json())["type"] == "connection_established"
            member = next(iter(app.context.consumers))
            # The first event holds the connection's sender; two more fill its buffer; the fourth overflows.
            member.deliver({"type": "image_update", "dream_id": 5})
            await StuckConsumer.stuck.wait()
            for _ in range(3):
                member.deliver({"type": "image_update", "dream_id": 5})
            StuckConsumer.gate.set()
            code, messages = await ws.expect_close()
        text = (await client.http.get("/metrics")).text
    assert code == 1013
    # The event that was being sent goes out; the buffered ones were dropped for the close.
    assert [(m["type"], m.get("code")) for m in messages] == [("image_update", None), ("error", "too_slow")]
    figures = samples(text)
    assert figures["dream_ws_slow_closed_total"] == 1
    assert figures['dream_ws_connections_closed_total{code="1013"}'] == 1


async def test_failed_publishes_and_their_retries_are_counted(make_app: MakeApp) -> None:
    app = make_app(metrics=True, publish_retries=2, publish_backoff=0.001)
    async with ConsumerTestClient(app) as client:

        async def broken(group: str, text: str) -> None:
            raise ConnectionError("backend down")

        backend = app.layer.backend
        assert backend is not None
        original = backend.publish
        backend.publish = broken  # type: ignore[method-assign]
        try:
            with pytest.raises(PublishError):
                await app.layer.publish("dream_images_1", {"type": "image_update"})
        finally:
            backend.publish = original  # type: ignore[method-assign]
        figures = samples((await client.http.get("/metrics")).text)
    assert figures["dream_ws_publish_failures_total"] == 1
    assert figures["dream_ws_publish_retries_total"] == 2
    assert figures["dream_ws_publishes_total"] == 0


def test_histogram_buckets_are_cumulative() -> None:
    histogram = Histogram((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 3.0):
        histogram.observe(value)
    lines = list(histogram_lines("x", histogram))
    assert lines == [
        'x_bucket{le="0.1"} 2',
        'x_bucket{le="1.0"} 3',
        'x_bucket{le="+Inf"} 4',
        "x_sum 3.65",
        "x_count 4",
    ]
