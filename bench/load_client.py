"""The load-generating client: N WebSocket connections to one server, every update counted.

    python bench/load_client.py --url ws://127.0.0.1:8000/dreams/{dream} --clients 1000 \\
        --dreams 10 --token JWT

One process for every stack under test, so it must cost the server as little CPU as possible
on a shared machine: picows on uvloop, where each frame is a callback into a listener, with
no task, queue or future per connection or per message; and orjson, which parses an update
in a fifth of the stdlib's time (a quarter of this process's CPU at 100,000 frames/s).

Client i watches dream `first_dream + i % dreams`. It prints JSON lines on stdout: `ready`
once every connection has its `connection_established` (or has failed), then answers the
commands read on stdin, one per line: `stats`, `report`, `reset`, `close` (EOF closes too).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import resource
import sys
import time
from array import array
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import uvloop
from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

SUBPROTOCOL = "dream-ws.v1"
TOKEN_PREFIX = "dream-ws.bearer."
PONG = b'{"type":"pong"}'
#: What `closed_by_server` counts for a connection dropped without a CLOSE frame.
ABNORMAL_CLOSURE = 1006
#: ... and for a CLOSE frame without a code (picows reads it as 0).
NO_STATUS_RECEIVED = 1005
CLOSE_TIMEOUT = 10.0

TEXT = WSMsgType.TEXT
CONTINUATION = WSMsgType.CONTINUATION
CLOSE = WSMsgType.CLOSE
loads = orjson.loads
now = time.time


class Stats:
    """What every connection adds to; `reset()` zeroes it between warm-up and measurement."""

    def __init__(self) -> None:
        self.closed_by_server: Counter[int] = Counter()
        self.reset()

    def reset(self) -> None:
        self.received = 0
        self.latencies = array("d")
        self.first_receive: float | None = None
        self.last_receive = 0.0
        self.out_of_order = 0
        self.wrong_dream = 0
        self.bad_frames = 0


def count_update(client: Any, data: dict[str, Any]) -> None:
    """One `image_update` received by `client` (which has `stats`, `dream`, `received` and
    `last_sequence`)."""
    stats = client.stats
    received_at = now()
    stats.latencies.append(received_at - data["timestamp"])
    stats.received += 1
    client.received += 1
    if stats.first_receive is None:
        stats.first_receive = received_at
    stats.last_receive = received_at
    if data["dream_id"] != client.dream:
        stats.wrong_dream += 1
    message = data.get("message")
    # The publisher numbers each dream's updates; any other message is not ordered.
    if type(message) is str and message.isdecimal():
        sequence = int(message)
        if sequence <= client.last_sequence:
            stats.out_of_order += 1
        client.last_sequence = sequence


class Client(WSListener):
    """One connection: counts its `image_update` frames into `stats`, answers server pings."""

    def __init__(self, stats: Stats, dream: int, established: asyncio.Future[None]) -> None:
        self.stats = stats
        self.dream = dream
        self.established = established
        self.transport: WSTransport | None = None
        self.received = 0
        self.last_sequence = -1
        self.closing = False
        self.close_received = False
        self.fragments: bytearray | None = None

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        msg_type = frame.msg_type
        if msg_type == TEXT and frame.fin:
            self.on_text(frame.get_payload_as_bytes())
        elif msg_type == CLOSE:
            self.on_close(transport, frame)
        elif msg_type == TEXT or (msg_type == CONTINUATION and self.fragments is not None):
            # The servers under test never fragment, but a fragmented frame must not be miscounted.
            if msg_type == TEXT:
                self.fragments = bytearray()
            assert self.fragments is not None
            self.fragments += frame.get_payload_as_memoryview()
            if frame.fin:
                text, self.fragments = bytes(self.fragments), None
                self.on_text(text)
        # PING is answered by picows itself; PONG and BINARY mean nothing here.

    def on_text(self, payload: bytes) -> None:
        stats = self.stats
        try:
            data = loads(payload)
            kind = data["type"]
            if kind == "image_update":
                count_update(self, data)
            elif kind == "ping":
                assert self.transport is not None
                self.transport.send(TEXT, PONG)
            elif kind == "connection_established" and not self.established.done():
                self.established.set_result(None)
        except (ValueError, KeyError, TypeError):
            stats.bad_frames += 1

    def on_close(self, transport: WSTransport, frame: WSFrame) -> None:
        self.close_received = True
        if not self.closing:
            code = frame.get_close_code().value or NO_STATUS_RECEIVED
            self.stats.closed_by_server[code] += 1
            transport.send_close(WSCloseCode.OK)
            self.fail_establishment(f"closed by the server with {code}")
        transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if not self.closing and not self.close_received:
            self.stats.closed_by_server[ABNORMAL_CLOSURE] += 1
            self.fail_establishment("connection lost")

    def fail_establishment(self, reason: str) -> None:
        if not self.established.done():
            self.established.set_exception(ConnectionError(f"{reason} before connection_established"))

    @property
    def open(self) -> bool:
        return self.transport is not None and not self.transport.is_disconnected


async def connect(url: str, token: str, stats: Stats, dream: int) -> Client:
    established: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    transport, listener = await ws_connect(
        lambda: Client(stats, dream, established),
        url.format(dream=dream),
        extra_headers={"Sec-WebSocket-Protocol": f"{SUBPROTOCOL}, {TOKEN_PREFIX}{token}"},
        websocket_handshake_timeout=None,
    )
    try:
        accepted = transport.response.headers.get("Sec-WebSocket-Protocol")
        if accepted != SUBPROTOCOL:
            raise ConnectionError(f"the server accepted the subprotocol {accepted!r}")
        await established
    except BaseException:
        assert isinstance(listener, Client)
        listener.closing = True
        transport.disconnect(graceful=False)
        raise
    assert isinstance(listener, Client)
    return listener


Connect = Callable[[str, str, Stats, int], Awaitable[Any]]


async def open_all(
    args: argparse.Namespace, stats: Stats, connect: Connect = connect
) -> tuple[list[Any], Counter[str], float]:
    """Open every connection, at most `connect_concurrency` at a time; returns clients, errors, seconds."""
    clients: list[Any] = []
    errors: Counter[str] = Counter()
    indices = iter(range(args.clients))
    start = last = time.monotonic()

    async def worker() -> None:
        nonlocal last
        for i in indices:
            dream = args.first_dream + i % args.dreams
            try:
                async with asyncio.timeout(args.connect_timeout):
                    clients.append(await connect(args.url, args.token, stats, dream))
                last = time.monotonic()
            except Exception as exc:
                errors[f"{type(exc).__name__}: {exc}"[:200]] += 1

    await asyncio.gather(*(worker() for _ in range(min(args.connect_concurrency, args.clients))))
    return clients, errors, (last - start if clients else time.monotonic() - start)


async def close_all(clients: list[Client]) -> None:
    """Close handshake (1000) on every open connection; drop whatever has not finished in time."""
    closing = [client for client in clients if client.open]
    for client in closing:
        assert client.transport is not None
        client.closing = True
        client.transport.send_close(WSCloseCode.OK)
    waits = [client.transport.wait_disconnected() for client in closing if client.transport is not None]
    try:
        async with asyncio.timeout(CLOSE_TIMEOUT):
            await asyncio.gather(*waits, return_exceptions=True)
    except TimeoutError:
        for client in closing:
            if client.open:
                assert client.transport is not None
                client.transport.disconnect(graceful=False)


def percentile(ordered: list[float], fraction: float) -> float:
    """Nearest-rank percentile of sorted values, in milliseconds."""
    # Rounded first, so that 0.95 * 1000 ranks 950 and not 951.
    rank = max(1, math.ceil(round(len(ordered) * fraction, 6)))
    return round(ordered[rank - 1] * 1000, 3)


def report(clients: list[Any], stats: Stats) -> dict[str, Any]:
    per_dream: Counter[int] = Counter()
    for client in clients:
        per_dream[client.dream] += client.received
    counts = [client.received for client in clients]
    latency: dict[str, float] | None = None
    if stats.latencies:
        ordered = sorted(stats.latencies)
        latency = {name: percentile(ordered, q) for name, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))}
        latency["max"] = round(ordered[-1] * 1000, 3)
    return {
        "event": "report",
        "connections_open": sum(client.open for client in clients),
        "closed_by_server": {str(code): count for code, count in sorted(stats.closed_by_server.items())},
        "received": stats.received,
        "received_per_dream": {str(dream): count for dream, count in sorted(per_dream.items())},
        "per_connection_min": min(counts, default=None),
        "per_connection_max": max(counts, default=None),
        "latency_ms": latency,
        "first_receive": stats.first_receive,
        "last_receive": stats.last_receive if stats.first_receive is not None else None,
        "out_of_order": stats.out_of_order,
        "wrong_dream": stats.wrong_dream,
        "bad_frames": stats.bad_frames,
        "cpu_seconds": round(time.process_time(), 3),
    }


def emit(event: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


async def main(
    args: argparse.Namespace, connect: Connect = connect, close: Callable[[list[Any]], Awaitable[None]] | None = None
) -> None:
    """`connect` and `close`: another kind of client (bench/sse_client.py) on the same commands."""
    stats = Stats()
    clients, errors, seconds = await open_all(args, stats, connect)
    emit(
        {
            "event": "ready",
            "connected": len(clients),
            "failed": args.clients - len(clients),
            "connect_seconds": round(seconds, 3),
            "cpu_seconds": round(time.process_time(), 3),
            "errors": dict(errors.most_common(5)),
        }
    )
    while True:
        # A thread, not the loop's reader: stdin may be a file or /dev/null, which epoll refuses.
        line = await asyncio.to_thread(sys.stdin.readline)
        command = line.strip() if line else "close"
        if command == "stats":
            emit({"event": "stats", "received": stats.received})
        elif command == "report":
            emit(report(clients, stats))
        elif command == "reset":
            stats.reset()
            for client in clients:
                # The measurement's publisher may number its messages afresh.
                client.received, client.last_sequence = 0, -1
        elif command == "close":
            await (close or close_all)(clients)
            emit({"event": "closed"})
            return
        elif command:
            emit({"event": "error", "message": f"unknown command {command!r}"})


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, help="with a {dream} placeholder")
    parser.add_argument("--clients", type=int, required=True)
    parser.add_argument("--dreams", type=int, required=True)
    parser.add_argument("--first-dream", type=int, default=1)
    parser.add_argument("--token", required=True)
    parser.add_argument("--connect-concurrency", type=int, default=200)
    parser.add_argument("--connect-timeout", type=float, default=60.0, help="seconds per connection")
    return parser.parse_args()


def raise_fd_limit() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


if __name__ == "__main__":
    raise_fd_limit()
    uvloop.run(main(parse_args()))
