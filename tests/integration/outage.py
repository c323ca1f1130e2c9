"""The delivery check shared by the outage tests of every backend.

Clients on two servers watch one dream while a separate producer process publishes a steady
stream; the backend stops mid-stream and restarts on the same port. Every update whose
`send_image_update` returned normally must reach every client, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any, Protocol

from websockets.asyncio.client import ClientConnection

from tests.support.producers import ProducerProcess, producer_call, run_producer
from tests.support.tokens import TokenFactory
from tests.support.uvicorn import UvicornServer

from .client import Transport, connect_dream, established, recv_json

PACE = 0.025  # seconds between two updates of the producer: a steady stream across the outage
CLIENTS_PER_SERVER = 3
DREAM = 31


class Backend(Protocol):
    url: str

    def start(self) -> None: ...

    def stop(self) -> None: ...


async def _collect(ws: ClientConnection, until: str, into: list[dict[str, Any]], started: asyncio.Event) -> None:
    """Record every image_update until the one whose message is `until`."""
    while True:
        message = await recv_json(ws, timeout=30.0)
        if message["type"] != "image_update":
            continue
        into.append(message)
        started.set()
        if message["message"] == until:
            return


async def check_delivery_across_outage(
    backend: Backend,
    servers: tuple[UvicornServer, UvicornServer],
    make_token: TokenFactory,
    *,
    updates: int,
    down_for: float,
) -> dict[str, Any]:
    """Run the scenario, assert its promises, and return its figures."""
    befores = [(await asyncio.to_thread(s.wait_backend_connected, 15.0))["backend_reconnects"] for s in servers]
    async with contextlib.AsyncExitStack() as stack:
        clients = []
        for server in servers:
            for n in range(CLIENTS_PER_SERVER):
                transport: Transport = ("query", "header", "subprotocol")[n % 3]
                ws = await stack.enter_async_context(connect_dream(server, DREAM, make_token(f"u{DREAM}"), transport))
                await established(ws, DREAM)
                clients.append(ws)
        received: list[list[dict[str, Any]]] = [[] for _ in clients]
        started = [asyncio.Event() for _ in clients]
        readers = [
            asyncio.create_task(_collect(ws, "end", into, event))
            for ws, into, event in zip(clients, received, started, strict=True)
        ]

        calls = [
            {
                **producer_call(DREAM, [f"https://cdn.example/{DREAM}/{i}.png"], "processing", f"seq={i}"),
                "pause_before": PACE,
            }
            for i in range(updates)
        ]
        producer = ProducerProcess(backend.url, calls)
        await asyncio.wait_for(asyncio.gather(*(event.wait() for event in started)), 15.0)

        backend.stop()
        # This sleep is the outage itself: the backend stays down while the producer keeps calling.
        await asyncio.sleep(down_for)
        backend.start()
        back_at = time.monotonic()
        reconnected_after = []
        for server in servers:
            await asyncio.to_thread(server.wait_backend_connected, 15.0)
            reconnected_after.append(time.monotonic() - back_at)

        outcomes = await asyncio.to_thread(producer.result, 60.0)
        returned = {f"seq={i}" for i, outcome in enumerate(outcomes) if outcome == {"ok": True}}
        final = producer_call(DREAM, [], "completed", "end")
        assert await asyncio.to_thread(run_producer, backend.url, [final]) == [{"ok": True}]
        await asyncio.wait_for(asyncio.gather(*readers), 30.0)

    for messages in received:
        got = [message["message"] for message in messages]
        assert got[-1] == "end"
        missing = returned - set(got)
        assert not missing, f"{len(missing)} updates that returned normally never arrived: {sorted(missing)[:10]}"
        sequence = [int(text.removeprefix("seq=")) for text in got[:-1]]
        assert sequence == sorted(sequence), "updates arrived out of order"
    for server, before in zip(servers, befores, strict=True):
        assert (await asyncio.to_thread(server.wait_backend_connected))["backend_reconnects"] > before
    return {
        "updates_sent": updates,
        "returned_normally": len(returned),
        "raised": updates - len(returned),
        "clients": len(clients),
        "received_per_client": [len(m) - 1 for m in received],
        # A publish that went through but whose answer was lost is retried: at least once.
        "max_duplicates_per_client": max(len(m) - len({x["message"] for x in m}) for m in received),
        "reconnect_seconds_after_backend_back": [round(t, 2) for t in reconnected_after],
    }
