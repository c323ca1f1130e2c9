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


class ConnectionState(enum.Enum):
    #: The client asked to connect; nothing has been sent.
    CONNECTING = "connecting"
    #: Accepted; the handshake hooks are still running, so group events wait.
    ACCEPTED = "accepted"
    #: Group events flow.
    OPEN = "open"
    #: A close was asked for; the error and the close frame are on their way.
    CLOSING = "closing"
    #: The close frame is sent, the client is gone or the connection was dropped.
    CLOSED = "closed"


_TRANSITIONS = {
    ConnectionState.CONNECTING: {ConnectionState.ACCEPTED, ConnectionState.CLOSED},  # closed: refused
    ConnectionState.ACCEPTED: {ConnectionState.OPEN, ConnectionState.CLOSING, ConnectionState.CLOSED},
    ConnectionState.OPEN: {ConnectionState.CLOSING, ConnectionState.CLOSED},
    ConnectionState.CLOSING: {ConnectionState.CLOSED},
    ConnectionState.CLOSED: set(),
}
_SENDING = frozenset({ConnectionState.ACCEPTED, ConnectionState.OPEN, ConnectionState.CLOSING})


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
    __slots__ = ("_metrics", "_receive", "_send", "close_code", "close_reason", "closing_since", "scope", "state")

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

    def _move(self, to: ConnectionState) -> None:
        if to not in _TRANSITIONS[self.state]:
            raise RuntimeError(f"a connection cannot go from {self.state.name} to {to.name}")
        self.state = to

    @property
    def accepting_events(self) -> bool:
        """Whether group events may still be buffered for this connection."""
        return self.close_reason is None and self.state in (
            ConnectionState.CONNECTING,
            ConnectionState.ACCEPTED,
            ConnectionState.OPEN,
        )

    def offered_subprotocols(self) -> list[str]:
        return [str(p).strip() for p in self.scope.get("subprotocols") or []]

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

    async def send_json(self, content: dict[str, Any]) -> None:
        """Send `content` as JSON text; a group event is sent as the text it arrived as."""
        if type(content) is GroupEvent:
            frame = content.frame
            if frame is None:
                # One ASGI message for every connection of the process that sends this event.
                frame = content.frame = {"type": "websocket.send", "text": content.text}
            await self.send_frame(frame)
        else:
            await self.send_frame({"type": "websocket.send", "text": encode(content)})

    async def send_text(self, text: str) -> None:
        await self.send_frame({"type": "websocket.send", "text": text})

    async def send_error(self, code: str, message: str) -> None:
        await self.send_json(error_message(code, message))

    async def send_frame(self, message: dict[str, Any]) -> None:
        if self.state not in _SENDING:
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
