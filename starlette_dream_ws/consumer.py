"""The generic consumer: one WebSocket connection, its life cycle and `type` dispatch.

As in Channels, handlers are found with `getattr` on a message's `type`:

* a client frame `{"type": "ping"}` calls `receive_ping(self, content)`;
* a group event `{"type": "image_update"}` (or `"image.update"`) calls `image_update(self, event)`.

Client messages get the `receive_` prefix so that no client can reach an event handler or a
life-cycle method by naming it. A `type` with no handler is answered with an `error`.

Each connection runs in the task the server gave it, which reads client frames. Group events
and heartbeat pings go through a bounded buffer, sent on the next pass of the event loop with
whatever else has arrived for the connection by then; only a send that has to wait (the client
is not reading) gets a task to finish in. When the buffer is full the client is too slow and is
closed with 1013.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

from starlette.datastructures import Headers, QueryParams
from starlette.requests import HTTPConnection
from starlette.types import Message, Receive, Scope, Send

from .auth import AuthenticationFailed, TokenVerifier, User, extract_token
from .eager import start_eagerly
from .heartbeat import Heartbeat
from .layer import BackendUnavailable, GroupEvent, GroupLayer, cancel_and_wait, encode
from .limits import RateLimiter, origin_allowed
from .metrics import ConnectionMetrics
from .settings import Settings

logger = logging.getLogger("starlette_dream_ws.consumer")

_TYPE_NAME = re.compile(r"[a-z][a-z0-9_.]{0,63}")
_PING = {"type": "ping"}
STOP_READING = "dream-ws: closed by the server"


#: Handler names found per (consumer class, prefix, type), so that a message's type is checked
#: and mapped once per process rather than once per connection.
_handler_names: dict[tuple[type, str, str], str | None] = {}
MAX_CACHED_HANDLERS = 4096


def _handler_name(prefix: str, kind: str) -> str | None:
    if not _TYPE_NAME.fullmatch(kind):
        return None
    name = prefix + kind.replace(".", "_")
    if hasattr(Consumer, name) or (not prefix and name.startswith("receive_")):
        # Nobody reaches the life-cycle API (`receive_json` included) by naming it, and
        # events may not call client handlers.
        return None
    return name


class CloseCodes:
    """Close codes of the protocol."""

    NORMAL = 1000
    GOING_AWAY = 1001
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    TRY_AGAIN_LATER = 1013
    UNAUTHENTICATED = 4401
    FORBIDDEN = 4403
    HEARTBEAT_TIMEOUT = 4408


class CloseConnection(Exception):
    """Raise from any hook or handler to send an `error` (if `error` is set) and close."""

    def __init__(self, code: int, error: str | None = None, message: str = "") -> None:
        super().__init__(message or error or str(code))
        self.code = code
        self.error = error
        self.message = message


@dataclasses.dataclass
class ConsumerContext:
    """What an app shares with every consumer it runs."""

    settings: Settings
    layer: GroupLayer
    verifier: TokenVerifier | None
    heartbeat: Heartbeat
    #: The integrator's authorizer, called by the consumer's `authorize()`.
    authorize: Callable[..., bool | Awaitable[bool]] | None = None
    #: Open consumers, so the app can close them on shutdown.
    consumers: set[Consumer] = dataclasses.field(default_factory=set)
    #: Set when the last consumer has ended, while the app is shutting down.
    drained: asyncio.Event | None = None
    #: Open connections per authenticated user id.
    per_user: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    metrics: ConnectionMetrics = dataclasses.field(default_factory=ConnectionMetrics)
    #: Consumers with events to send on the next pass of the loop, and the callback that will.
    _due: list[Consumer] = dataclasses.field(default_factory=list, init=False, repr=False)
    _due_handle: asyncio.Handle | None = dataclasses.field(default=None, init=False, repr=False)

    def send_soon(self, consumer: Consumer) -> None:
        """Have `consumer` send what it has buffered on the next pass of the loop.

        One callback for every connection rather than one each: a fan-out allocates nothing
        per connection that the garbage collector would then have to walk.
        """
        self._due.append(consumer)
        if self._due_handle is None:
            self._due_handle = asyncio.get_running_loop().call_soon(self._send_due)

    def _send_due(self) -> None:
        self._due_handle = None
        due, self._due = self._due, []
        for consumer in due:
            consumer._send_buffered()

    def remove(self, consumer: Consumer) -> None:
        self.consumers.discard(consumer)
        if consumer.counted_user is not None:
            self.per_user[consumer.counted_user] -= 1
            if self.per_user[consumer.counted_user] <= 0:
                del self.per_user[consumer.counted_user]
            consumer.counted_user = None
        if not self.consumers and self.drained is not None:
            self.drained.set()


class Consumer:
    """Base class of a WebSocket consumer. Override the hooks, add handlers."""

    #: Subprotocol chosen when the client offers it.
    subprotocol: ClassVar[str | None] = None

    # Slots: there is one consumer per open connection. `__dict__` keeps adding other
    # attributes possible; the dict is only made for an instance that does.
    __slots__ = (
        "__dict__",
        "_abandoned",
        "_accepted",
        "_accepted_subprotocol",
        "_close_sent",
        "_closed",
        "_closing_since",
        "_due",
        "_events",
        "_last_seen",
        "_metrics",
        "_next_event",
        "_next_ping",
        "_pending_close",
        "_pump",
        "_pumping",
        "_rate",
        "_reader",
        "_ready",
        "_receive",
        "_send",
        "_waiting_for_client",
        "close_code",
        "context",
        "counted_user",
        "groups",
        "layer",
        "opened_at",
        "scope",
        "settings",
        "user",
    )

    def __init__(self, scope: Scope, receive: Receive, send: Send, context: ConsumerContext) -> None:
        self.scope = scope
        self.context = context
        self.settings = context.settings
        self.layer = context.layer
        self.user: User | None = None
        #: Groups this connection has joined (a tuple: most connections join one, and a set
        #: costs 216 bytes even empty).
        self.groups: tuple[str, ...] = ()
        self.close_code: int | None = None
        self._receive = receive
        self._send = send
        self._metrics = context.metrics
        self._accepted = False
        self._ready = False
        self._close_sent = False
        self._closed = False
        self._accepted_subprotocol: str | None = None
        #: Events waiting to be sent after `_next_event`, oldest first (a list, made only when
        #: more than one waits: a deque costs over 600 bytes however few it holds).
        self._events: list[dict[str, Any]] | None = None
        #: The oldest waiting event when it is the only one (no list is made for one).
        self._next_event: dict[str, Any] | None = None
        self._pump: asyncio.Task[None] | None = None
        self._pumping = False
        #: Whether the context will call `_send_buffered` on the next pass of the loop.
        self._due = False
        self._reader: asyncio.Task[Any] | None = None
        self._waiting_for_client = False
        self._pending_close: CloseConnection | None = None
        #: Monotonic time a server-side close began (None: not closing).
        self._closing_since: float | None = None
        self._abandoned = False
        self._last_seen = time.monotonic()
        self._next_ping = self._last_seen + self.settings.heartbeat_interval
        self.opened_at = time.time()
        #: The user id this connection counts against in `max_connections_per_user`.
        self.counted_user: str | None = None
        self._rate = RateLimiter(self.settings.max_messages_per_second, self.settings.message_burst)

    @property
    def connection(self) -> HTTPConnection:
        """The handshake request: headers, query parameters, client address."""
        return HTTPConnection(self.scope)

    # -- hooks ------------------------------------------------------------------------------

    async def connect(self) -> None:
        """Handshake: accept, authenticate the token, ask `authorize()`.

        Accepting first lets close codes reach browsers: a refused handshake shows them
        only 1006. Override to join groups and greet the client, calling this first.
        """
        await self.accept()
        self.check_origin()
        self.user = self.authenticate()
        self.count_user(self.user)
        if not await self.authorize():
            raise CloseConnection(CloseCodes.FORBIDDEN, "forbidden", "you may not watch this")

    def check_origin(self) -> None:
        """Refuse pages of other sites (cross-site WebSocket hijacking) with 1008."""
        headers = self._headers()
        if not origin_allowed(headers.get("origin"), headers.get("host"), self.settings.allowed_origins):
            self.log_event("refused", reason="origin_not_allowed")
            raise CloseConnection(CloseCodes.POLICY_VIOLATION, "origin_not_allowed", "this origin may not connect")

    def log_event(self, event: str, level: int = logging.INFO, **fields: Any) -> None:
        """One structured log line: `event key=value ...`, the fields also in `record.dream_ws`.

        Never given a token: paths come without their query string, users by id.
        """
        if not logger.isEnabledFor(level):
            return
        fields = {"path": self.scope.get("path"), **fields}
        if self.user is not None:
            fields.setdefault("user", self.user.id)
        text = " ".join(f"{key}={value}" for key, value in fields.items())
        logger.log(level, "%s %s", event, text, extra={"dream_ws": {"event": event, **fields}})

    def count_user(self, user: User) -> None:
        """Count this connection against its user's limit (1013 past `max_connections_per_user`)."""
        per_user = self.context.per_user
        if per_user[user.id] >= self.settings.max_connections_per_user:
            raise CloseConnection(
                CloseCodes.TRY_AGAIN_LATER, "too_many_connections", "this user has too many open connections"
            )
        per_user[user.id] += 1
        self.counted_user = user.id

    def authenticate(self) -> User:
        if self.context.verifier is None:
            raise CloseConnection(CloseCodes.UNAUTHENTICATED, "unauthenticated", "no token verifier configured")
        query = QueryParams(self.scope.get("query_string", b""))
        token, _ = extract_token(query, self._headers(), self._offered_subprotocols())
        try:
            return self.context.verifier.verify(token)
        except AuthenticationFailed as exc:
            self.log_event("auth_failed", reason=exc.reason)
            raise CloseConnection(CloseCodes.UNAUTHENTICATED, "unauthenticated", exc.message) from None

    async def authorize(self) -> bool:
        """May `self.user` use this connection? Denies unless a subclass decides."""
        return False

    async def receive_json(self, content: dict[str, Any]) -> None:
        """Called for each client JSON object; dispatches on its `type`."""
        kind = content.get("type")
        if not isinstance(kind, str):
            await self.send_error("invalid_message", "every message needs a string 'type'")
            return
        handler = self._handler("receive_", kind)
        if handler is None:
            await self.send_error("unknown_type", f"unknown message type {kind[:64]!r}")
            return
        await handler(content)

    async def disconnect(self, code: int) -> None:
        """Called once when the connection has ended, whichever side closed it."""

    # -- API for handlers -------------------------------------------------------------------

    async def accept(self, subprotocol: str | None = None) -> None:
        if self._accepted:
            return
        offered = self._offered_subprotocols()
        if subprotocol is None and self.subprotocol in offered:
            subprotocol = self.subprotocol
        self._accepted_subprotocol = subprotocol
        await self._send({"type": "websocket.accept", "subprotocol": subprotocol})
        self._accepted = True

    async def send_json(self, content: dict[str, Any]) -> None:
        """Send `content` as JSON text; a group event is sent as the text it arrived as."""
        if type(content) is GroupEvent:
            await self._send_frame(content.send_message)
        else:
            await self._send_frame({"type": "websocket.send", "text": encode(content)})

    async def send_text(self, text: str) -> None:
        await self._send_frame({"type": "websocket.send", "text": text})

    async def _send_frame(self, message: dict[str, Any]) -> None:
        if self._close_sent or self._closed:
            return
        try:
            await self._send(message)
        except Exception as exc:  # the client went away: the reader sees the disconnect
            logger.debug("send failed: %s", type(exc).__name__)
            self._closed = True
            return
        self._metrics.messages_out += 1

    async def send_error(self, code: str, message: str) -> None:
        await self.send_json({"type": "error", "code": code, "message": message})

    async def close(self, code: int = CloseCodes.NORMAL, reason: str = "") -> None:
        if self._close_sent or self._closed:
            return
        self._close_sent = True
        self.close_code = code
        try:
            await self._send({"type": "websocket.close", "code": code, "reason": reason})
        except Exception as exc:
            logger.debug("close failed: %s", type(exc).__name__)

    async def group_add(self, group: str) -> None:
        """Join `group`: its events reach this connection until it leaves or closes."""
        try:
            await self.layer.join(group, self)
        except BackendUnavailable:
            raise CloseConnection(CloseCodes.TRY_AGAIN_LATER, "unavailable", "updates are unavailable now") from None
        if group not in self.groups:
            self.groups = (*self.groups, group)

    async def group_discard(self, group: str) -> None:
        self.groups = tuple(g for g in self.groups if g != group)
        await self.layer.leave(group, self)

    # -- group events -----------------------------------------------------------------------

    def deliver(self, event: dict[str, Any]) -> None:
        """Queue a group event for this connection (called by the layer, never blocks)."""
        if self._buffer(event) and not self._due:
            # Sent on the next pass of the loop rather than now: a burst of events (a backend
            # read returns many) then goes out connection by connection, several frames in a
            # row, which costs both ends far less than one frame per connection in turn.
            self._due = True
            self.context.send_soon(self)

    def _buffer(self, event: dict[str, Any]) -> bool:
        """Add `event` to the buffer; whether a send should be started for it."""
        if self._closed or self._close_sent or self._pending_close is not None:
            return False
        events = self._events
        if self._next_event is None and not events:
            self._next_event = event
            return self._ready and not self._pumping
        if events is None:
            events = self._events = []
        elif len(events) + (self._next_event is not None) >= self.settings.max_pending_events:
            events.clear()
            self._next_event = None
            self._metrics.slow_closed += 1
            self.log_event("too_slow", logging.WARNING, pending=self.settings.max_pending_events)
            self.close_soon(CloseConnection(CloseCodes.TRY_AGAIN_LATER, "too_slow", "too many updates waiting"))
            return False
        events.append(event)
        return self._ready and not self._pumping

    def _send_buffered(self) -> None:
        self._due = False
        if not self._closed:
            self._start_pump()

    def close_soon(self, reason: CloseConnection) -> None:
        """Close from outside the reader (timers, the layer): sends an error and closes."""
        if self._closed or self._close_sent or self._pending_close is not None:
            return
        self._pending_close = reason
        self._closing_since = time.monotonic()
        if self._ready:
            self._start_pump()

    def _abandon(self) -> None:
        # The close has waited `close_timeout` behind bytes the client does not read. ASGI
        # cannot abort a socket, but ending the connection's tasks frees everything of ours;
        # the server closes the socket once the application returns.
        if self._abandoned:
            return
        self._abandoned = True
        if self.close_code is None and self._pending_close is not None:
            self.close_code = self._pending_close.code
        self._closed = True
        self._metrics.dropped += 1
        self.log_event("dropped", logging.WARNING, reason="close_timeout")
        if self._pump is not None:
            self._pump.cancel()
        if self._reader is not None:
            self._reader.cancel(STOP_READING)

    def _start_pump(self) -> None:
        # Most sends complete at once, so the buffer is drained right here, and only a send
        # that has to wait (the socket is full) gets a task to finish in.
        if not self._pumping:
            self._pumping = True
            self._pump = start_eagerly(self._drain())

    async def _drain(self) -> None:
        try:
            while self._pending_close is None:
                current = self._next_event
                if current is not None:
                    self._next_event = None
                elif self._events:
                    current = self._events.pop(0)  # at most `max_pending_events`: a short move
                else:
                    break
                if current is _PING:
                    await self.send_json({"type": "ping", "timestamp": time.time()})
                    continue
                # The hot path of every fan-out, so inline rather than one more coroutine.
                kind = current["type"]
                handler = self._handler("", kind)
                if handler is None:
                    logger.warning("no handler for group event type %r", kind[:64])
                    await self.send_error("unknown_event", f"no handler for event type {kind[:64]!r}")
                    continue
                try:
                    await handler(current)
                except CloseConnection as exc:
                    await self._close_with(exc)
                    self._stop_reading()
                except Exception:
                    logger.exception("handler for group event %r failed", kind[:64])
            if self._pending_close is not None:
                await self._close_with(self._pending_close)
                self._stop_reading()
        finally:
            self._pumping = False
            self._pump = None
            if not self._events:
                self._events = None  # most connections are idle: hold no buffer for them

    def _handler(self, prefix: str, kind: str) -> Callable[[dict[str, Any]], Awaitable[None]] | None:
        key = (type(self), prefix, kind)
        try:
            name = _handler_names[key]
        except KeyError:
            name = _handler_name(prefix, kind)
            if len(_handler_names) < MAX_CACHED_HANDLERS:  # types come from clients: bounded
                _handler_names[key] = name
        if name is None:
            return None
        handler = getattr(self, name, None)
        return handler if callable(handler) else None

    # -- heartbeat --------------------------------------------------------------------------

    def heartbeat(self, now: float) -> None:
        if self._closing_since is not None:
            if now - self._closing_since >= self.settings.close_timeout:
                self._abandon()
            return
        if now - self._last_seen >= self.settings.effective_heartbeat_timeout:
            self.close_soon(CloseConnection(CloseCodes.HEARTBEAT_TIMEOUT, "heartbeat_timeout", "no message in time"))
            return
        expires_at = self.user.expires_at if self.user is not None else None
        if expires_at is not None and time.time() >= expires_at + self.settings.jwt_leeway:
            self.close_soon(CloseConnection(CloseCodes.UNAUTHENTICATED, "token_expired", "the token has expired"))
            return
        if now >= self._next_ping:
            self._next_ping = now + self.settings.heartbeat_interval
            # Sent at once: a tick pings many connections, and nothing held for the next pass
            # of the loop (per connection) is then alive for all of them together.
            if self._buffer(_PING) and not self._due:
                self._start_pump()

    # -- running ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve the connection until it closes; every task it started has ended on return."""
        message = await self._receive()
        if message["type"] != "websocket.connect":
            return
        code = CloseCodes.NORMAL
        self.context.consumers.add(self)
        self._reader = asyncio.current_task()
        # Nested rather than split into coroutines: every frame here lives as long as the
        # connection, and idle connections are what a server holds most of.
        try:
            try:
                if len(self.context.consumers) > self.settings.max_connections:
                    raise CloseConnection(CloseCodes.TRY_AGAIN_LATER, "too_many_connections", "the server is full")
                await self.connect()
                if not self._accepted:
                    await self.accept()
                # Events that arrived during the handshake wait until the greeting is out.
                self._ready = True
                if self._next_event is not None or self._events or self._pending_close is not None:
                    self._start_pump()
                self.context.heartbeat.add(self)
                self._metrics.accepted += 1
                self.log_event("connected")
                # The wait for client frames, here rather than in a coroutine of its own: a
                # connection waits in it for as long as it is open.
                while True:
                    self._waiting_for_client = True
                    try:
                        message = await self._receive()
                    finally:
                        self._waiting_for_client = False
                    if message["type"] == "websocket.disconnect":
                        code = int(message.get("code") or CloseCodes.NORMAL)
                        break
                    await self._handle_frame(message)
                    if self._close_sent:
                        code = self.close_code or CloseCodes.NORMAL
                        break
            except CloseConnection as exc:
                code = exc.code
                await self._close_with(exc)
            except Exception:
                code = 1011
                logger.exception("consumer failed")
                await self._close_with(CloseConnection(1011, "internal_error", "internal error"))
        except asyncio.CancelledError as exc:
            # `_stop_reading()` or `_abandon()`: the connection is over, not the server.
            if exc.args != (STOP_READING,):
                raise
            task = asyncio.current_task()
            assert task is not None
            task.uncancel()
            code = self.close_code or code
        finally:
            await self._teardown(code)

    def _stop_reading(self) -> None:
        # After we closed, ASGI servers deliver `websocket.disconnect` once the client answers;
        # a client that never does must not keep the connection's task alive.
        if self._reader is not None and self._waiting_for_client:
            self._reader.cancel(STOP_READING)

    async def _handle_frame(self, message: Message) -> None:
        """One client frame: rate and size limits, JSON, dispatch; raises `CloseConnection`."""
        self._metrics.messages_in += 1
        # One clock reading (and one float kept) for both.
        self._last_seen = now = time.monotonic()
        if not self._rate.take(now):
            if self._rate.strikes >= self._rate.burst:
                raise CloseConnection(CloseCodes.POLICY_VIOLATION, "rate_limited", "too many messages")
            if self._rate.strikes == 1:
                await self.send_error("rate_limited", "too many messages: this one and any more are dropped")
            return
        limit = self.settings.max_message_size
        text = message.get("text")
        if text is None:
            data = message.get("bytes") or b""
            if len(data) > limit:
                raise self._too_big(limit)
            await self.send_error("binary_not_supported", "send JSON text frames")
            return
        if len(text) > limit or len(text.encode()) > limit:
            raise self._too_big(limit)
        try:
            content = json.loads(text)
        except (ValueError, RecursionError):
            await self.send_error("invalid_json", "the frame is not valid JSON")
            return
        if not isinstance(content, dict):
            await self.send_error("invalid_message", "each frame must be one JSON object")
            return
        try:
            await self.receive_json(content)
        except CloseConnection:
            raise
        except Exception:
            logger.exception("handler for client message failed")
            await self.send_error("internal_error", "the message could not be handled")

    @staticmethod
    def _too_big(limit: int) -> CloseConnection:
        return CloseConnection(CloseCodes.MESSAGE_TOO_BIG, "message_too_big", f"frames are limited to {limit} bytes")

    async def _close_with(self, reason: CloseConnection) -> None:
        if self._closing_since is None:
            self._closing_since = time.monotonic()
        if not self._accepted:
            try:
                await self.accept()
            except Exception:
                return
        if reason.error is not None:
            await self.send_error(reason.error, reason.message)
        await self.close(reason.code)

    async def _teardown(self, code: int) -> None:
        self._closed = True
        self.context.heartbeat.discard(self)
        self.context.remove(self)
        groups, self.groups = self.groups, ()
        for group in groups:
            try:
                await self.layer.leave(group, self)
            except Exception as exc:
                logger.warning("leaving %s failed: %s", group, type(exc).__name__)
        pump = self._pump
        if pump is not None and pump is not asyncio.current_task():
            await cancel_and_wait(pump)
        self._events = self._next_event = None
        self._metrics.closed[self.close_code or code] += 1
        self.log_event(
            "closed",
            code=self.close_code or code,
            by="server" if self.close_code is not None else "client",
            duration=f"{time.time() - self.opened_at:.3f}",
        )
        try:
            await self.disconnect(self.close_code or code)
        except Exception:
            logger.exception("disconnect hook failed")

    def _headers(self) -> Headers:
        # A copy that lives as long as the call: `self.connection.headers` would store its copy in
        # the scope, for as long as the connection is open.
        return Headers(raw=list(self.scope.get("headers") or ()))

    def _offered_subprotocols(self) -> list[str]:
        return [str(p).strip() for p in self.scope.get("subprotocols") or []]
