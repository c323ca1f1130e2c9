"""The generic consumer: the life cycle of one connection and `type` dispatch (`dispatch.py`).

Each connection runs in the task the server gave it, which reads client frames. Group events
and heartbeat pings go through the connection's `Outbox`. The transport and its state are
`Connection`'s, the checks of the handshake `Handshake`'s; this class adds the life cycle,
dispatch, the limits checked per frame and the end of the connection.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, ClassVar

from starlette.types import Message, Receive, Scope, Send

from ..groups import BackendUnavailable, GroupLayer
from ..protocol import CloseCodes, Position
from .connection import CloseConnection, ConnectionState
from .context import ConsumerContext
from .dispatch import CLIENT_PREFIX, EVENT_PREFIX, Handler, find_handler
from .frames import BadFrame, decode_frame
from .handshake import Handshake
from .heartbeat import overdue
from .limits import RateLimiter
from .outbox import PING, Outbox
from .resume import Resumption, resume
from .schemas import BASE, MessageSchemas
from .sse import is_event_stream

logger = logging.getLogger("starlette_dream_ws.consumer")

#: The cancellation message that ends a connection's reader, not the server.
STOP_READING = "dream-ws: closed by the server"


class Consumer(Handshake):
    """Base class of a WebSocket consumer. Override the hooks, add handlers."""

    #: The shapes of the messages this class sends and receives (for the AsyncAPI document);
    #: a subclass declares what it adds.
    message_schemas: ClassVar[MessageSchemas] = BASE

    # Slots: there is one consumer per open connection. `__dict__` keeps adding other
    # attributes possible; the dict is only made for an instance that does.
    __slots__ = (
        "__dict__",
        "_last_seen",
        "_next_ping",
        "_rate",
        "_reader",
        "_waiting_for_client",
        "groups",
        "layer",
        "opened_at",
        "outbox",
    )

    def __init__(self, scope: Scope, receive: Receive, send: Send, context: ConsumerContext) -> None:
        super().__init__(scope, receive, send, context)
        self.layer: GroupLayer = context.layer
        #: Groups this connection has joined (a tuple: most connections join one, and a set
        #: costs 216 bytes even empty).
        self.groups: tuple[str, ...] = ()
        self.outbox = Outbox(self)
        self._reader: asyncio.Task[Any] | None = None
        self._waiting_for_client = False
        self._last_seen = time.monotonic()
        self._next_ping = self._last_seen + self.settings.heartbeat_interval
        self.opened_at = time.time()
        self._rate = RateLimiter(self.settings.max_messages_per_second, self.settings.message_burst)

    # -- hooks (the handshake's are in `Handshake`) ---------------------------------------

    async def receive_json(self, content: dict[str, Any]) -> None:
        """Called for each client JSON object; dispatches on its `type`."""
        kind = content.get("type")
        if not isinstance(kind, str):
            await self.send_error("invalid_message", "every message needs a string 'type'")
            return
        handler = find_handler(self, CLIENT_PREFIX, kind, Consumer)
        if handler is None:
            await self.send_error("unknown_type", f"unknown message type {kind[:64]!r}")
            return
        await handler(content)

    async def disconnect(self, code: int) -> None:
        """Called once when the connection has ended, whichever side closed it."""

    # -- API for handlers -------------------------------------------------------------------

    async def group_add(self, group: str) -> None:
        """Join `group`: its events reach this connection until it leaves or closes."""
        try:
            await self.layer.join(group, self)
        except BackendUnavailable:
            raise CloseConnection(CloseCodes.TRY_AGAIN_LATER, "unavailable", "updates are unavailable now") from None
        if group not in self.groups:
            self.groups = (*self.groups, group)

    async def resume(self, group: str, since: Position) -> Resumption:
        """After `group_add`: what a client that has seen `since` missed of `group` (send the
        greeting with `recovered`, then these events; live ones follow, never older)."""
        return await resume(self.layer, group, since)

    async def group_discard(self, group: str) -> None:
        self.groups = tuple(g for g in self.groups if g != group)
        await self.layer.leave(group, self)

    # -- group events -----------------------------------------------------------------------

    def deliver(self, event: dict[str, Any]) -> None:
        """Queue a group event for this connection (called by the layer, never blocks)."""
        self.outbox.put(event)

    def event_handler(self, kind: str) -> Handler | None:
        """The handler of a group event `type` (the outbox awaits it when it is the event's turn)."""
        return find_handler(self, EVENT_PREFIX, kind, Consumer)

    async def unknown_event(self, event: dict[str, Any]) -> None:
        kind = event["type"][:64]
        logger.warning("no handler for group event type %r", kind)
        await self.send_error("unknown_event", f"no handler for event type {kind!r}")

    def close_soon(self, reason: CloseConnection) -> None:
        """Close from outside the reader (timers, the layer): sends an error and closes."""
        if self.request_close(reason):
            self.outbox.flush()

    def too_slow(self) -> None:
        """The outbox overflowed: the client cannot keep up (1013)."""
        self._metrics.slow_closed += 1
        self.log_event("too_slow", logging.WARNING, pending=self.settings.max_pending_events)
        self.close_soon(CloseConnection(CloseCodes.TRY_AGAIN_LATER, "too_slow", "too many updates waiting"))

    def heartbeat(self, now: float) -> None:
        """Ping when due; close for silence or an expired token; drop a close stuck too long."""
        if self.closing_since is not None:
            if now - self.closing_since >= self.settings.close_timeout:
                self._abandon()
            return
        expires_at = self.user.expires_at if self.user is not None else None
        # An event stream's client sends nothing: the end of its request is what says it left.
        last_seen = now if is_event_stream(self.scope) else self._last_seen
        reason = overdue(last_seen, expires_at, now, self.settings)
        if reason is not None:
            self.close_soon(reason)
        elif now >= self._next_ping:
            self._next_ping = now + self.settings.heartbeat_interval
            self.outbox.put_now(PING)

    def _abandon(self) -> None:
        # The close has waited `close_timeout` behind bytes the client does not read. ASGI
        # cannot abort a socket, but ending the connection's tasks frees everything of ours;
        # the server closes the socket once the application returns.
        self.closing_since = None
        if self.close_code is None and self.close_reason is not None:
            self.close_code = self.close_reason.code
        self.ended()
        self._metrics.dropped += 1
        self.log_event("dropped", logging.WARNING, reason="close_timeout")
        self.outbox.cancel()
        if self._reader is not None:
            self._reader.cancel(STOP_READING)

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
                await self.accept()
                # Events that arrived during the handshake wait until the greeting is out.
                if self.opened() or self.outbox.pending:
                    self.outbox.flush()
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
                    if self.state is ConnectionState.CLOSED:
                        code = self.close_code or CloseCodes.NORMAL
                        break
            except CloseConnection as exc:
                code = exc.code
                await self.close_with(exc)
            except Exception:
                code = CloseCodes.INTERNAL_ERROR
                logger.exception("consumer failed")
                await self.close_with(CloseConnection(code, "internal_error", "internal error"))
        except asyncio.CancelledError as exc:
            # `stop_reading()` or `_abandon()`: the connection is over, not the server.
            if exc.args != (STOP_READING,):
                raise
            task = asyncio.current_task()
            assert task is not None
            task.uncancel()
            code = self.close_code or code
        finally:
            await self._teardown(code)

    def stop_reading(self) -> None:
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
        try:
            content = decode_frame(message, self.settings.max_message_size)
            await self.receive_json(content)
        except CloseConnection:
            raise
        except BadFrame as exc:
            await self.send_error(exc.code, exc.message)
        except Exception:
            logger.exception("handler for client message failed")
            await self.send_error("internal_error", "the message could not be handled")

    async def _teardown(self, code: int) -> None:
        self.ended()
        self.context.heartbeat.discard(self)
        self.context.remove(self)
        if self.counted_user is not None:
            self.context.release_user(self.counted_user)
            self.counted_user = None
        groups, self.groups = self.groups, ()
        for group in groups:
            try:
                await self.layer.leave(group, self)
            except Exception as exc:
                logger.warning("leaving %s failed: %s", group, type(exc).__name__)
        await self.outbox.aclose()
        code = self.close_code or code
        self._metrics.closed[code] += 1
        by = "server" if self.close_code is not None else "client"
        self.log_event("closed", code=code, by=by, duration=f"{time.time() - self.opened_at:.3f}")
        try:
            await self.disconnect(code)
        except Exception:
            logger.exception("disconnect hook failed")
