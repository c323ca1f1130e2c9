"""The Server-Sent Events transport: the same consumers, one way, over plain HTTP.

`GET <mount>/dreams/{dream_id}/events` runs the very consumer a WebSocket would, through an
adapter that speaks ASGI WebSocket to the consumer and SSE to the client, so authentication,
authorization, limits, heartbeat, positions and resume are the same code:

* the consumer's accept sends nothing yet: a refusal before the first event is plain HTTP
  (401, 403, 400, 429, 503) with the `error` message as its JSON body;
* each text frame becomes one event (`event:` its type, `data:` the same JSON, `id:` the
  position of an update, so that `EventSource` resumes with `Last-Event-ID`); a `ping` is a
  comment line;
* a close ends the stream (the client reconnects by itself and resumes).

A group event is framed once per process however many streams send it (a small cache by
identity of the shared ASGI message), as the WebSocket path sends one text to all.
"""

from __future__ import annotations

import collections
import json

from starlette.types import Message, Receive, Scope, Send

from ..protocol import CloseCodes, encode, error_message

#: Milliseconds `EventSource` waits before reconnecting (sent once, as `retry:`).
RETRY_MS = 1000
HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    # Proxies that buffer responses (nginx) would hold events back.
    (b"x-accel-buffering", b"no"),
]
PING_COMMENT = b": ping\n\n"
#: HTTP status for a refusal before the stream starts, by error code (else by close code).
STATUS_BY_ERROR = {
    "unauthenticated": 401,
    "forbidden": 403,
    "origin_not_allowed": 403,
    "too_many_connections": 429,
    "unavailable": 503,
    "invalid_since": 400,
    "invalid_dream_id": 400,
    "invalid_id": 400,
}
STATUS_BY_CODE = {
    CloseCodes.UNAUTHENTICATED: 401,
    CloseCodes.FORBIDDEN: 403,
    CloseCodes.POLICY_VIOLATION: 403,
    CloseCodes.TRY_AGAIN_LATER: 503,
    CloseCodes.GOING_AWAY: 503,
}
#: Group events framed lately, by identity of their shared ASGI message.
_FRAMED: collections.OrderedDict[int, tuple[Message, bytes]] = collections.OrderedDict()
MAX_FRAMED = 256


def frame_event(text: str) -> bytes:
    """One SSE event for a JSON message (the text a WebSocket would carry)."""
    content = json.loads(text)
    kind = content.get("type") if isinstance(content, dict) else None
    if kind == "ping":
        return PING_COMMENT
    lines = [f"event: {kind if isinstance(kind, str) else 'message'}"]
    if isinstance(content, dict) and isinstance(content.get("epoch"), str) and isinstance(content.get("seq"), int):
        lines.append(f"id: {content['epoch']}:{content['seq']}")
    lines.extend(f"data: {line}" for line in text.splitlines() or [""])
    return ("\n".join(lines) + "\n\n").encode()


def _framed(message: Message) -> bytes:
    key = id(message)
    cached = _FRAMED.get(key)
    if cached is not None and cached[0] is message:
        return cached[1]
    data = frame_event(message["text"])
    _FRAMED[key] = (message, data)
    if len(_FRAMED) > MAX_FRAMED:
        _FRAMED.popitem(last=False)
    return data


class EventStream:
    """ASGI WebSocket messages from a consumer, as an SSE response to an HTTP request."""

    __slots__ = ("_connected", "_receive", "_refusal", "_send", "_started")

    def __init__(self, receive: Receive, send: Send) -> None:
        self._receive = receive
        self._send = send
        self._connected = False
        self._started = False
        #: An `error` sent before the stream started: the body of the refusal that follows.
        self._refusal: str | None = None

    async def receive(self) -> Message:
        if not self._connected:
            self._connected = True
            return {"type": "websocket.connect"}
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                return {"type": "websocket.disconnect", "code": CloseCodes.GOING_AWAY}
            # A request body is not part of this protocol: read and ignored.

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "websocket.send":
            if not self._started:
                text = message.get("text") or ""
                if text.startswith('{"type":"error"'):
                    self._refusal = text
                    return
                await self._start(200)
                await self._body(f"retry: {RETRY_MS}\n\n".encode())
            await self._body(_framed(message))
        elif kind == "websocket.close":
            if not self._started:
                await self._refuse(int(message.get("code") or CloseCodes.NORMAL))
            else:
                await self._send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _refuse(self, code: int) -> None:
        body = self._refusal or encode(error_message("closed", "the stream was refused"))
        error = json.loads(body).get("code")
        status = STATUS_BY_ERROR.get(error) or STATUS_BY_CODE.get(code, 500)
        self._started = True
        await self._send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json"), (b"cache-control", b"no-store")],
            }
        )
        await self._send({"type": "http.response.body", "body": body.encode(), "more_body": False})

    async def _start(self, status: int) -> None:
        self._started = True
        await self._send({"type": "http.response.start", "status": status, "headers": HEADERS})

    async def _body(self, data: bytes) -> None:
        await self._send({"type": "http.response.body", "body": data, "more_body": True})


def is_event_stream(scope: Scope) -> bool:
    """Whether a consumer's scope is an SSE request (one way: the client sends nothing)."""
    return bool(scope["type"] == "http")


def events_path(path: str) -> str:
    """The SSE path of a consumer's WebSocket path."""
    return path.rstrip("/") + "/events"


def not_allowed() -> tuple[Message, Message]:
    body = encode(error_message("method_not_allowed", "event streams are read with GET")).encode()
    return (
        {
            "type": "http.response.start",
            "status": 405,
            "headers": [(b"content-type", b"application/json"), (b"allow", b"GET")],
        },
        {"type": "http.response.body", "body": body},
    )


def accepts(scope: Scope) -> bool:
    return bool(scope.get("method") == "GET")
