"""One WebSocket connection's transport: its state, and the only methods that send on it.

The state is one enum, and `_move` is the one place that checks a transition, as Starlette's
`WebSocketState`. Sending is possible from ACCEPTED to CLOSING; once the close frame is out
(or the client is gone) the connection is CLOSED and every send is a no-op.
"""

from __future__ import annotations

import enum
import logging
import time
from typing import Any

from starlette.types import Receive, Scope, Send

from ..groups import GroupEvent
from ..protocol import CloseCodes, encode, error_message
from .metrics import ConnectionMetrics

logger = logging.getLogger("starlette_dream_ws.consumer")


class ConnectionState(enum.IntEnum):
    """In the order a connection goes through them (an `IntEnum`: the checks on the hot path
    of every fan-out are integer comparisons, not calls of `Enum.__hash__`)."""

    #: The client asked to connect; nothing has been sent.
    CONNECTING = 0
    #: Accepted; the handshake hooks are still running, so group events wait.
    ACCEPTED = 1
    #: Group events flow.
    OPEN = 2
    #: A close was asked for; the error and the close frame are on their way.
    CLOSING = 3
    #: The close frame is sent, the client is gone or the connection was dropped.
    CLOSED = 4


# Module-level names for the checks on the hot path (no lookup on the enum class each time).
_ACCEPTED, _OPEN, _CLOSING = ConnectionState.ACCEPTED, ConnectionState.OPEN, ConnectionState.CLOSING

_TRANSITIONS = {
    ConnectionState.CONNECTING: {ConnectionState.ACCEPTED, ConnectionState.CLOSED},  # closed: refused
    ConnectionState.ACCEPTED: {ConnectionState.OPEN, ConnectionState.CLOSING, ConnectionState.CLOSED},
    ConnectionState.OPEN: {ConnectionState.CLOSING, ConnectionState.CLOSED},
    ConnectionState.CLOSING: {ConnectionState.CLOSED},
    ConnectionState.CLOSED: set(),
}


def _frame(event: GroupEvent) -> dict[str, Any]:
    """One ASGI message for every connection of the process that sends this event."""
    frame = event.frame
    if frame is None:
        frame = event.frame = {"type": "websocket.send", "text": event.text}
    return frame  # type: ignore[no-any-return]


class CloseConnection(Exception):
    """Raise from any hook or handler to send an `error` (if `error` is set) and close."""

    def __init__(self, code: int, error: str | None = None, message: str = "") -> None:
        super().__init__(message or error or str(code))
        self.code = code
        self.error = error
        self.message = message


class Connection:
    """The transport of one connection: accept, send, close, and the state they move through."""

    #: Subprotocol chosen when the client offers it.
    subprotocol: str | None = None

    # Slots: there is one per open connection.
    __slots__ = (
        "_metrics",
        "_receive",
        "_send",
        "_sent",
        "close_code",
        "close_reason",
        "closing_since",
        "scope",
        "state",
    )

    def __init__(self, scope: Scope, receive: Receive, send: Send, metrics: ConnectionMetrics) -> None:
        self.scope = scope
        self.state = ConnectionState.CONNECTING
        #: The code of the close frame we sent (None: the client closed, or nothing is sent yet).
        self.close_code: int | None = None
        #: A close asked for from outside the handshake and reader (timers, the groups layer).
        self.close_reason: CloseConnection | None = None
        #: Monotonic time a server-side close began (None: nothing to wait for).
        self.closing_since: float | None = None
        self._receive = receive
        self._send = send
        self._metrics = metrics
        #: The newest group event sent, per group (made at the first one: most connections
        #: sit idle and never need it).
        self._sent: dict[str, GroupEvent] | None = None

    def _move(self, to: ConnectionState) -> None:
        if to not in _TRANSITIONS[self.state]:
            raise RuntimeError(f"a connection cannot go from {self.state.name} to {to.name}")
        self.state = to

    @property
    def accepting_events(self) -> bool:
        """Whether group events may still be buffered for this connection."""
        return self.close_reason is None and self.state <= _OPEN

    def offered_subprotocols(self) -> list[str]:
        # ASGI gives one entry per subprotocol, but some servers pass the header's comma-separated
        # list as one entry (uvicorn 0.35's websockets-sansio, Granian before 2.7.5): split it, or
        # a token sent as a subprotocol is not found. A subprotocol never holds a comma.
        offered = self.scope.get("subprotocols") or []
        return [part.strip() for entry in offered for part in str(entry).split(",") if part.strip()]

    async def accept(self, subprotocol: str | None = None) -> None:
        if self.state is not ConnectionState.CONNECTING:
            return
        if subprotocol is None and self.subprotocol in self.offered_subprotocols():
            subprotocol = self.subprotocol
        await self._send({"type": "websocket.accept", "subprotocol": subprotocol})
        self._move(ConnectionState.ACCEPTED)

    def opened(self) -> bool:
        """The handshake is done: events may flow, or the close asked for meanwhile may go out.
        Whether anything is to be sent now."""
        if self.state is not ConnectionState.ACCEPTED:
            return False  # closed by a hook, or the client went away
        if self.close_reason is not None:
            self._move(ConnectionState.CLOSING)
            return True
        self._move(ConnectionState.OPEN)
        return False

    def request_close(self, reason: CloseConnection) -> bool:
        """Ask for a close from outside the reader; whether it can be sent now (else when the
        handshake ends). False if the connection is closing already."""
        if not self.accepting_events:
            return False
        self.close_reason = reason
        self.closing_since = time.monotonic()
        if self.state is ConnectionState.OPEN:
            self._move(ConnectionState.CLOSING)
            return True
        return False

    def last_sent(self, group: str) -> GroupEvent | None:
        """The newest event of `group` this connection has sent."""
        return self._sent.get(group) if self._sent is not None else None

    def _is_new(self, event: GroupEvent) -> bool:
        """Whether `event` comes after every event of its group sent here; noted as sent if so.
        On one connection, positions never go back: an update that is not newer is not sent."""
        if event.position is None:
            return True
        sent = self._sent
        if sent is None:
            sent = self._sent = {}
        last = sent.get(event.group)
        if last is not None and not event.position.follows(last.position):
            return False
        sent[event.group] = event
        return True

    async def send_latest(self, event: GroupEvent) -> None:
        """Send `event` as a group's latest state, or the newer one already sent if it is older:
        the answer is never older than what the connection has seen."""
        if not self._is_new(event):
            event = self.last_sent(event.group) or event
        await self.send_frame(_frame(event))

    async def send_json(self, content: dict[str, Any]) -> None:
        """Send `content` as JSON text; a group event is sent as the text it arrived as, and only
        if it is newer than what this connection has sent of its group."""
        if type(content) is GroupEvent:
            if content.position is None or self._is_new(content):
                await self.send_frame(content.frame or _frame(content))
        else:
            await self.send_frame({"type": "websocket.send", "text": encode(content)})

    async def send_text(self, text: str) -> None:
        await self.send_frame({"type": "websocket.send", "text": text})

    async def send_error(self, code: str, message: str) -> None:
        await self.send_json(error_message(code, message))

    async def send_frame(self, message: dict[str, Any]) -> None:
        # Frames go out from accepted until the close frame is sent.
        if not _ACCEPTED <= self.state <= _CLOSING:
            return
        try:
            await self._send(message)
        except Exception as exc:  # the client went away: the reader sees the disconnect
            logger.debug("send failed: %s", type(exc).__name__)
            self.ended()
            return
        self._metrics.messages_out += 1

    async def close(self, code: int = CloseCodes.NORMAL, reason: str = "") -> None:
        """Send the close frame (before `accept()`, the server refuses the handshake instead)."""
        if self.state is ConnectionState.CLOSED:
            return
        self._move(ConnectionState.CLOSED)
        self.close_code = code
        try:
            await self._send({"type": "websocket.close", "code": code, "reason": reason})
        except Exception as exc:
            logger.debug("close failed: %s", type(exc).__name__)
            if code != CloseCodes.NORMAL:
                # Daphne (through autobahn) refuses every code but 1000 and 3000-4999, and then
                # leaves the connection open after the app has ended: the client would wait for
                # ever. A normal close ends it; the `error` sent before it says why. `close_code`
                # keeps the reason the app closed for. Where the client is gone, this fails too.
                try:
                    await self._send({"type": "websocket.close", "code": CloseCodes.NORMAL, "reason": reason})
                except Exception as retry:
                    logger.debug("close failed: %s", type(retry).__name__)

    async def close_with(self, reason: CloseConnection) -> None:
        """Send `reason`'s error (accepting first, so that browsers see the code) and close."""
        if self.closing_since is None:
            self.closing_since = time.monotonic()
        if self.state is ConnectionState.CONNECTING:
            try:
                await self.accept()
            except Exception:
                self.ended()
                return
        if reason.error is not None:
            await self.send_error(reason.error, reason.message)
        await self.close(reason.code)

    def ended(self) -> None:
        """Nothing more can be sent: the client left, or we gave up on it."""
        if self.state is not ConnectionState.CLOSED:
            self._move(ConnectionState.CLOSED)
