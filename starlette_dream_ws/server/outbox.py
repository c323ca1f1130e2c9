"""The outgoing path of a connection: group events and pings wait in a bounded buffer and go
out on the next pass of the event loop, several frames in a row.

Most sends complete at once (the socket takes them), so the buffer is drained right where it
is flushed, and only a send that has to wait (the client is not reading) gets a task to finish
in (`eager.start_eagerly`). When the buffer is full the client is too slow and is closed with 1013.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from typing import TYPE_CHECKING, Any

from ..groups import GroupEvent
from ..tasks import cancel_and_wait
from .connection import CloseConnection, ConnectionState
from .eager import start_eagerly

if TYPE_CHECKING:
    from .consumer import Consumer

logger = logging.getLogger("starlette_dream_ws.consumer")

#: The heartbeat's entry in a buffer: a `ping` stamped when it is sent.
PING: dict[str, Any] = {"type": "ping"}


class StatusAnswer(dict[str, Any]):
    """A buffer entry: answer with this group event as the latest state (`send_latest`). In
    the buffer, so that it goes out in order with the group's live events, never between the
    decision to send one and its send."""

    __slots__ = ("event",)

    def __init__(self, event: GroupEvent) -> None:
        super().__init__()
        self.event = event


class OutboxState(enum.Enum):
    IDLE = "idle"
    #: Will be flushed on the next pass of the loop.
    SCHEDULED = "scheduled"
    #: Being flushed (possibly waiting in a task for a slow client).
    SENDING = "sending"


# Module-level names for the hot path of every fan-out: a lookup on an enum class costs a call.
_IDLE, _SCHEDULED, _SENDING = OutboxState.IDLE, OutboxState.SCHEDULED, OutboxState.SENDING
_OPEN, _CLOSED = ConnectionState.OPEN, ConnectionState.CLOSED


class Outbox:
    """What waits to be sent to one connection, and the one path that sends it."""

    __slots__ = ("_consumer", "_events", "_next", "_state", "_task")

    def __init__(self, consumer: Consumer) -> None:
        self._consumer = consumer
        self._state = _IDLE
        #: The oldest waiting event when it is the only one (no list is made for one).
        self._next: dict[str, Any] | None = None
        #: Events waiting after `_next`, oldest first (a list, made only when more than one waits:
        #: a deque costs over 600 bytes however few it holds).
        self._events: list[dict[str, Any]] | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def pending(self) -> bool:
        return self._next is not None or bool(self._events)

    def put(self, event: dict[str, Any]) -> None:
        """Buffer `event`, to be sent on the next pass of the loop (never blocks)."""
        if self._add(event):
            # Sent on the next pass rather than now: a burst of events (a backend read returns
            # many) then goes out connection by connection, several frames in a row, which
            # costs both ends far less than one frame per connection in turn.
            self._state = _SCHEDULED
            self._consumer.context.scheduler.soon(self)

    def put_now(self, event: dict[str, Any]) -> None:
        """Buffer `event` and start sending at once (a heartbeat tick pings many connections,
        and nothing held for the next pass is then alive for all of them together)."""
        if self._add(event):
            self.flush()

    def _add(self, event: dict[str, Any]) -> bool:
        """Add `event` to the buffer; whether a flush should be started for it."""
        consumer = self._consumer
        if consumer.close_reason is not None or consumer.state > _OPEN:
            return False
        events = self._events
        if self._next is None and not events:
            self._next = event
        else:
            if events is None:
                events = self._events = []
            elif len(events) + (self._next is not None) >= consumer.settings.max_pending_events:
                self.clear()
                consumer.too_slow()
                return False
            events.append(event)
        return consumer.state is _OPEN and self._state is _IDLE

    def flush(self) -> None:
        """Send what waits now, unless a flush is under way (it will send it)."""
        if self._state is _SENDING:
            return
        if self._consumer.state is _CLOSED:
            self._state = _IDLE
            return
        self._state = _SENDING
        self._task = start_eagerly(self._send_all())

    def flush_scheduled(self) -> None:
        if self._state is _SCHEDULED:
            self._state = _IDLE
            self.flush()

    async def _send_all(self) -> None:
        consumer = self._consumer
        try:
            while consumer.close_reason is None:
                current = self._next
                if current is not None:
                    self._next = None
                elif self._events:
                    current = self._events.pop(0)  # at most `max_pending_events`: a short move
                else:
                    break
                if current is PING:
                    await consumer.send_json({"type": "ping", "timestamp": time.time()})
                elif type(current) is StatusAnswer:
                    await consumer.send_latest(current.event)
                else:
                    # The hot path of every fan-out: the handler is awaited here, not through
                    # one more coroutine.
                    handler = consumer.event_handler(current["type"])
                    if handler is None:
                        await consumer.unknown_event(current)
                        continue
                    try:
                        await handler(current)
                    except CloseConnection as exc:
                        await consumer.close_with(exc)
                        consumer.stop_reading()
                    except Exception:
                        logger.exception("handler for group event %r failed", current["type"][:64])
            if consumer.close_reason is not None:
                await consumer.close_with(consumer.close_reason)
                consumer.stop_reading()
        finally:
            self._state = _IDLE
            self._task = None
            if not self._events:
                self._events = None  # most connections are idle: hold no buffer for them

    def clear(self) -> None:
        self._next = self._events = None

    def cancel(self) -> None:
        """Stop a send that waits for the client (the connection is given up)."""
        if self._task is not None:
            self._task.cancel()

    async def aclose(self) -> None:
        """Stop sending and drop what waits; returns once the sending task has ended."""
        await cancel_and_wait(self._task)
        self.clear()


class SendScheduler:
    """Flushes, on the next pass of the loop, every outbox that has something new to send.

    One callback for every connection rather than one each: a fan-out allocates nothing per
    connection that the garbage collector would then have to walk.
    """

    def __init__(self) -> None:
        self._due: list[Outbox] = []
        self._handle: asyncio.Handle | None = None

    def soon(self, outbox: Outbox) -> None:
        self._due.append(outbox)
        if self._handle is None:
            self._handle = asyncio.get_running_loop().call_soon(self._flush_due)

    def _flush_due(self) -> None:
        self._handle = None
        due, self._due = self._due, []
        for outbox in due:
            outbox.flush_scheduled()
