"""The load client for Server-Sent Events: N event streams on one server, every update counted.

    python bench/sse_client.py --url http://127.0.0.1:8000/dreams/{dream}/events --clients 1000 \\
        --dreams 10 --token JWT

The same commands and figures as `load_client.py` (which it reuses), with a plain asyncio
protocol per stream on uvloop (no task per connection): an HTTP/1.1 GET with the token as a
Bearer header, the chunked body decoded as it arrives, each `data:` line parsed with orjson.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any
from urllib.parse import urlsplit

import uvloop
from load_client import Stats, count_update, loads, main, parse_args, raise_fd_limit


class StreamClient(asyncio.Protocol):
    """One event stream: counts its `image_update` events into `stats`."""

    def __init__(self, stats: Stats, dream: int, established: asyncio.Future[None]) -> None:
        self.stats = stats
        self.dream = dream
        self.established = established
        self.transport: asyncio.Transport | None = None
        self.received = 0
        self.last_sequence = -1
        self.closing = False
        self.buffer = b""
        self.headers_done = False
        self.chunk_left = 0  # bytes of the current chunk still to come (then its CRLF)
        self.events = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport subclass

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.headers_done:
            head, sep, rest = self.buffer.partition(b"\r\n\r\n")
            if not sep:
                return
            status = head.split(b"\r\n", 1)[0]
            if b" 200 " not in status:
                self.fail(f"HTTP {status.decode(errors='replace')}")
                return
            self.headers_done, self.buffer = True, rest
        self.decode_chunks()

    def decode_chunks(self) -> None:
        buffer = self.buffer
        while buffer:
            if self.chunk_left == 0:
                line, sep, rest = buffer.partition(b"\r\n")
                if not sep:
                    break
                if not line:  # the CRLF after a chunk's data
                    buffer = rest
                    continue
                self.chunk_left = int(line.split(b";")[0], 16)
                buffer = rest
                if self.chunk_left == 0:
                    self.fail("the stream ended")
                    return
            take = buffer[: self.chunk_left]
            self.chunk_left -= len(take)
            buffer = buffer[len(take) :]
            self.events += take.replace(b"\r\n", b"\n")  # either line ending is SSE
        self.buffer = buffer
        while b"\n\n" in self.events:
            block, self.events = self.events.split(b"\n\n", 1)
            for line in block.split(b"\n"):
                if line.startswith(b"data: "):
                    self.on_data(line[6:])

    def on_data(self, payload: bytes) -> None:
        try:
            data = loads(payload)
            kind = data["type"]
            if kind == "image_update":
                count_update(self, data)
            elif kind == "connection_established" and not self.established.done():
                self.established.set_result(None)
        except (ValueError, KeyError, TypeError):
            self.stats.bad_frames += 1

    def fail(self, reason: str) -> None:
        if not self.closing:
            self.stats.closed_by_server[1006] += 1
        if not self.established.done():
            self.established.set_exception(ConnectionError(reason))
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closing:
            self.fail("connection lost")

    @property
    def open(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()


async def connect(url: str, token: str, stats: Stats, dream: int) -> StreamClient:
    parts = urlsplit(url.format(dream=dream))
    established: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    _, client = await asyncio.get_running_loop().create_connection(
        lambda: StreamClient(stats, dream, established), parts.hostname, parts.port
    )
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    request = (
        f"GET {target} HTTP/1.1\r\nHost: {parts.netloc}\r\nAccept: text/event-stream\r\n"
        f"Authorization: Bearer {token}\r\n\r\n"
    )
    assert client.transport is not None
    client.transport.write(request.encode())
    try:
        await established
    except BaseException:
        client.closing = True
        client.transport.close()
        raise
    return client


async def close_all(clients: list[Any]) -> None:
    for client in clients:
        client.closing = True
        if client.transport is not None:
            client.transport.close()
    await asyncio.sleep(0)  # let the transports close


if __name__ == "__main__":
    raise_fd_limit()
    sys.exit(uvloop.run(main(parse_args(), connect, close_all)))
