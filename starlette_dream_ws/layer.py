"""Groups on a broadcaster backend: one backend connection and one subscription per group per
process, with our own fan-out to the local members of each group.

broadcaster's `Broadcast` gives each subscriber an unbounded queue and races when two
subscribe to a new channel at once, so we use only its backends and do the rest here:
members are plain objects with a non-blocking `deliver(event)`, every published message is
decoded once per process, and a lost backend connection is re-established by the reader task.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NoReturn, Protocol, TypeGuard, TypeVar, runtime_checkable
from urllib.parse import urlsplit

from broadcaster import Event
from broadcaster._backends.base import BroadcastBackend

from .metrics import PublishMetrics
from .settings import Settings
from .state import StateStore, create_state_store

logger = logging.getLogger("starlette_dream_ws.layer")

T = TypeVar("T")

#: Longest pause between two attempts to reconnect a lost backend, in seconds.
MAX_RECONNECT_DELAY = 1.0

# Retrying cannot mend these: they are bugs or bad arguments, raised at once.
PROGRAMMING_ERRORS = (TypeError, ValueError, KeyError, AttributeError, AssertionError, NotImplementedError)


class Member(Protocol):
    def deliver(self, event: dict[str, Any]) -> None:
        """Take one event without blocking (buffer it, or drop the member if it cannot keep up)."""


class BackendUnavailable(ConnectionError):
    """The groups backend cannot be reached right now."""


class PublishError(ConnectionError):
    """A message could not be published after every retry; nothing was delivered."""


@runtime_checkable
class HistoryBackend(Protocol):
    """A backend that keeps each group's recent messages, with ids in publish order.

    The layer uses it to deliver what was published while it was reconnecting, and as the
    store of each group's latest state. Events it returns carry their id as `event.id`.
    """

    async def history(self, channel: str, after: str | None) -> Sequence[Event]: ...

    async def last_id(self, channel: str) -> str | None: ...

    async def latest(self, channel: str) -> str | None: ...


def keeps_history(backend: object) -> TypeGuard[HistoryBackend]:
    """Whether `backend` offers catch-up (checked once per backend class: a runtime protocol
    check costs more than the publish it would guard)."""
    kind = type(backend)
    known = _history_classes.get(kind)
    if known is None:
        known = _history_classes[kind] = isinstance(backend, HistoryBackend)
    return known


_history_classes: dict[type, bool] = {}


def create_backend(url: str, settings: Settings | None = None) -> BroadcastBackend:
    """The backend for a URL: broadcaster's for memory, ours for Redis and PostgreSQL.

    Any other `BroadcastBackend` can be used by passing a factory to `GroupLayer`.
    """
    scheme = urlsplit(url).scheme
    if scheme in ("redis", "rediss"):
        from .redis_pubsub import RedisPubSubBackend

        if settings is None:
            return RedisPubSubBackend(url)
        return RedisPubSubBackend(url, ttl=settings.state_ttl, history_size=settings.history_size)
    if scheme == "memory":
        from broadcaster._backends.memory import MemoryBackend

        return MemoryBackend(url)
    if scheme in ("postgres", "postgresql"):
        from .postgres import PostgresBackend

        if settings is None:
            return PostgresBackend(url)
        return PostgresBackend(url, ttl=settings.state_ttl, history_size=settings.history_size)
    raise ValueError(f"unsupported broadcast URL scheme: {scheme!r}")


def encode(message: dict[str, Any]) -> str:
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False)


class GroupEvent(dict[str, Any]):
    """A group event as members get it, with the JSON text it arrived as.

    One instance is shared by every local member, so it is read-only (copy it to change it:
    `{**event, ...}`), and a consumer forwarding it unchanged sends `text` as is: each message
    is decoded and encoded once per process, however many connections receive it.
    """

    __slots__ = ("_send_message", "text")

    def __init__(self, content: dict[str, Any], text: str) -> None:
        super().__init__(content)
        self.text = text
        self._send_message: dict[str, Any] | None = None

    @property
    def send_message(self) -> dict[str, Any]:
        """The ASGI `websocket.send` message of `text`, one for every connection that sends it."""
        if self._send_message is None:
            self._send_message = {"type": "websocket.send", "text": self.text}
        return self._send_message

    def _read_only(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise TypeError("a group event is shared by every member: copy it to change it")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = __ior__ = _read_only


def _position(event_id: str) -> tuple[int, int]:
    # History ids are "<milliseconds>-<sequence>" (Redis stream ids).
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq or 0)


#: Live events held for one group while its missed events are read after a reconnect.
MAX_BACKLOG = 10_000


#: Most groups subscribed (or unsubscribed) with one command.
MAX_SUBSCRIBE_BATCH = 500
SUBSCRIBE, UNSUBSCRIBE = "subscribe", "unsubscribe"


class _Group:
    __slots__ = ("backlog", "error", "last_id", "members", "ready")

    def __init__(self) -> None:
        self.members: set[Member] = set()
        #: Set once subscribing has ended, with `error` set if it failed.
        self.ready = asyncio.Event()
        self.error: BaseException | None = None
        #: Id of the newest event delivered (history backends only).
        self.last_id: str | None = None
        #: Live events that arrived while catching up; None when not catching up.
        self.backlog: list[Event] | None = None

    def is_new(self, event_id: str) -> bool:
        return self.last_id is None or _position(event_id) > _position(self.last_id)


class GroupLayer:
    """Publish to and listen on named groups, shared by every connection of one app.

    Bound to the event loop it first connects on. `connect()` is lazy and idempotent, so an
    app that is mounted (whose lifespan Starlette never runs) connects on first use.
    """

    def __init__(self, settings: Settings, backend_factory: Callable[[str], BroadcastBackend] | None = None) -> None:
        self.settings = settings
        self._factory = backend_factory or functools.partial(create_backend, settings=settings)
        self._backend: BroadcastBackend | None = None
        self._state: StateStore | None = None
        self._groups: dict[str, _Group] = {}
        self._reader: asyncio.Task[None] | None = None
        self._resubscriber: asyncio.Task[None] | None = None
        #: Subscriptions to make or undo, in order, and the task that makes them in batches.
        self._changes: list[tuple[str, str, _Group]] = []
        self._subscriber: asyncio.Task[None] | None = None
        self._subscribe_wanted: asyncio.Event | None = None
        self._lock: asyncio.Lock | None = None
        self._healthy: asyncio.Event | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        #: How many times the backend connection was re-established.
        self.reconnects = 0
        self.publish_metrics = PublishMetrics()

    # -- life cycle -------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._reader is not None and not self._reader.done()

    @property
    def healthy(self) -> bool:
        return self.connected and self._healthy is not None and self._healthy.is_set()

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        if self.loop is not loop:
            if self.loop is not None and not self.loop.is_closed() and self.loop.is_running():
                raise RuntimeError("this layer is connected on another running event loop")
            self._reset(loop)
        assert self._lock is not None
        if self.connected:
            return
        async with self._lock:
            if self.connected:
                return
            if self._backend is not None:
                # The reader ended unexpectedly; its backend is of no further use.
                await _quietly(self._backend.disconnect())
                self._backend = None
            try:
                backend = self._factory(self.settings.broadcast_url)
            except Exception as exc:
                raise BackendUnavailable(f"cannot build the groups backend: {type(exc).__name__}") from exc
            try:
                await backend.connect()
            except Exception as exc:
                await _quietly(backend.disconnect())
                raise BackendUnavailable(f"cannot connect to the groups backend: {type(exc).__name__}") from exc
            self._backend = backend
            if self._state is None:
                self._state = create_state_store(self.settings.effective_state_url)
            self._reader = loop.create_task(self._read(), name="dream-ws layer reader")
            self._start_subscriber()
            assert self._healthy is not None
            if self._groups:
                # Members of groups left from a reader that ended must be subscribed again.
                self._resubscriber = loop.create_task(self._resubscribe(), name="dream-ws layer resubscribe")
            else:
                self._healthy.set()

    def _reset(self, loop: asyncio.AbstractEventLoop) -> None:
        # A new loop (tests, a restarted server): state of the old loop cannot be reused.
        self.loop = loop
        self._backend = None
        self._state = None
        self._reader = None
        self._resubscriber = None
        self._subscriber = None
        self._changes = []
        self._subscribe_wanted = asyncio.Event()
        self._groups = {}
        self._lock = asyncio.Lock()
        self._healthy = asyncio.Event()

    async def disconnect(self) -> None:
        """Stop listening and close the backend; members are dropped."""
        reader, self._reader = self._reader, None
        if reader is not None:
            await cancel_and_wait(reader)
        subscriber, self._subscriber = self._subscriber, None
        if subscriber is not None:
            await cancel_and_wait(subscriber)
        joins = [(group, entry) for kind, group, entry in self._changes if kind == SUBSCRIBE]
        self._fail_joins(joins, BackendUnavailable("the groups layer was disconnected"))
        self._changes = []
        self._groups.clear()
        if self._healthy is not None:
            self._healthy.clear()
        backend, self._backend = self._backend, None
        if backend is not None:
            await _quietly(backend.disconnect())
        state, self._state = self._state, None
        if state is not None:
            await _quietly(state.close())

    # -- groups -----------------------------------------------------------------------------

    def local_members(self, group: str) -> int:
        entry = self._groups.get(group)
        return len(entry.members) if entry is not None else 0

    async def join(self, group: str, member: Member) -> None:
        """Add `member` to `group`; once this returns, every later publish reaches it.

        Raises `BackendUnavailable` if the group cannot be subscribed now.
        """
        await self.connect()
        entry = self._groups.get(group)
        if entry is None:
            await self._wait_healthy()
            entry = self._groups.get(group)
        if entry is None:
            # New groups are subscribed in batches by one task: a burst of connections to
            # different groups costs a few round trips to the backend, not two each.
            entry = self._groups[group] = _Group()
            self._change(SUBSCRIBE, group, entry)
        entry.members.add(member)
        if entry.ready.is_set() and entry.error is None:
            return
        try:
            await entry.ready.wait()
        except BaseException:
            # The subscriber drops (or unsubscribes) a group nobody is waiting for any more.
            entry.members.discard(member)
            raise
        if entry.error is not None:
            entry.members.discard(member)
            raise BackendUnavailable(f"cannot subscribe to {group}: {type(entry.error).__name__}") from entry.error
        if member not in entry.members:
            # Left while subscribing.
            self._unsubscribe_if_empty(group, entry)

    def _change(self, kind: str, group: str, entry: _Group) -> None:
        self._changes.append((kind, group, entry))
        assert self._subscribe_wanted is not None
        self._subscribe_wanted.set()
        self._start_subscriber()

    def _start_subscriber(self) -> None:
        if self._subscriber is None or self._subscriber.done():
            assert self.loop is not None
            self._subscriber = self.loop.create_task(self._subscribe_queued(), name="dream-ws layer subscriber")

    async def _subscribe_queued(self) -> None:
        """Make the queued changes of subscriptions, in order, a batch at a time, until cancelled.

        One task does them all, in the order they were asked for: a group left and joined
        again is unsubscribed, then subscribed, whatever the timing.
        """
        assert self._subscribe_wanted is not None
        while True:
            await self._subscribe_wanted.wait()
            self._subscribe_wanted.clear()
            while self._changes:
                kind = self._changes[0][0]
                count = 1
                while count < min(len(self._changes), MAX_SUBSCRIBE_BATCH) and self._changes[count][0] == kind:
                    count += 1
                taken = [(group, entry) for _, group, entry in self._changes[:count]]
                del self._changes[:count]
                if kind == SUBSCRIBE:
                    await self._subscribe_joins(taken)
                else:
                    await self._unsubscribe_batch([group for group, _ in taken])

    async def _subscribe_joins(self, taken: list[tuple[str, _Group]]) -> None:
        batch = []
        for group, entry in taken:
            if self._groups.get(group) is not entry:
                continue
            if not entry.members:  # all left before their turn: no subscription
                del self._groups[group]
                entry.ready.set()
                continue
            batch.append((group, entry))
        if not batch:
            return
        try:
            await self._subscribe_batch(batch)
        except asyncio.CancelledError:
            self._fail_joins(batch, BackendUnavailable("the groups layer was disconnected"))
            raise
        except Exception as exc:
            self._fail_joins(batch, exc)
            return
        for group, entry in batch:
            entry.ready.set()
            if not entry.members:  # all left while subscribing
                self._unsubscribe_if_empty(group, entry)

    async def _unsubscribe_batch(self, groups: list[str]) -> None:
        assert self._lock is not None
        async with self._lock:
            backend = self._backend
            if backend is None or not self.healthy:
                return  # the reconnect subscribes only the groups that have members
            try:
                await _in_one_go(backend, "unsubscribe", groups)
            except Exception as exc:
                logger.warning("unsubscribing from %d groups failed: %s", len(groups), type(exc).__name__)

    async def _subscribe_batch(self, batch: list[tuple[str, _Group]]) -> None:
        assert self._lock is not None
        groups = [group for group, _ in batch]
        await self._wait_healthy()
        async with self._lock:
            backend = self._backend
            if backend is None:
                raise BackendUnavailable("the groups backend is reconnecting")
            await _in_one_go(backend, "subscribe", groups)
            if keeps_history(backend):
                # Where a catch-up after a reconnect starts: nothing older than now.
                last_ids = getattr(backend, "last_ids", None)
                if last_ids is not None:
                    baselines = await last_ids(groups)
                else:
                    baselines = [await backend.last_id(group) for group in groups]
                for (_, entry), baseline in zip(batch, baselines, strict=True):
                    if baseline is not None and entry.is_new(baseline):
                        entry.last_id = baseline

    def _fail_joins(self, batch: list[tuple[str, _Group]], error: BaseException) -> None:
        for group, entry in batch:
            entry.error = error
            if self._groups.get(group) is entry:
                del self._groups[group]
            entry.ready.set()

    async def leave(self, group: str, member: Member) -> None:
        entry = self._groups.get(group)
        if entry is None or member not in entry.members:
            return
        entry.members.discard(member)
        if entry.ready.is_set():
            self._unsubscribe_if_empty(group, entry)

    def _unsubscribe_if_empty(self, group: str, entry: _Group) -> None:
        if entry.members or self._groups.get(group) is not entry:
            return
        del self._groups[group]
        if self.healthy:  # else the reconnect will not subscribe it again
            self._change(UNSUBSCRIBE, group, entry)

    def _fan_out(self, group: str, event: dict[str, Any]) -> None:
        entry = self._groups.get(group)
        if entry is None:
            return
        # A copy: deliver() starts sending at once, and a handler may leave the group.
        for member in tuple(entry.members):
            try:
                member.deliver(event)
            except Exception:
                logger.exception("delivering to a member of %s failed", group)

    # -- publishing -------------------------------------------------------------------------

    async def publish(self, group: str, message: dict[str, Any], *, remember: bool = False) -> None:
        """Send `message` to every member of `group` in every process, retrying with backoff.

        With `remember`, the message is also kept as the group's latest state (for
        `state_ttl` seconds; a history backend keeps every message anyway). Raises
        `PublishError` once every retry has failed.
        """
        text = encode(message)

        async def attempt() -> None:
            await self.connect()
            await self._wait_healthy()
            backend, state = self._backend, self._state
            if backend is None or state is None:
                raise BackendUnavailable("the groups backend is reconnecting")
            if remember and not keeps_history(backend):
                await state.remember(group, text, self.settings.state_ttl)
            await backend.publish(group, text)

        metrics = self.publish_metrics
        started = time.perf_counter()
        try:
            await self.retrying(attempt, what=f"publish to {group}")
        except PublishError:
            metrics.failures += 1
            logger.error(
                "publish_failed group=%s", group, extra={"dream_ws": {"event": "publish_failed", "group": group}}
            )
            raise
        metrics.published += 1
        metrics.seconds.observe(time.perf_counter() - started)

    async def latest(self, group: str) -> dict[str, Any] | None:
        """The group's latest remembered message, or None."""

        async def read() -> str | None:
            await self.connect()
            backend, state = self._backend, self._state
            if keeps_history(backend):
                return await backend.latest(group)
            if state is None:
                raise BackendUnavailable("the groups backend is reconnecting")
            return await state.latest(group)

        async with asyncio.timeout(self.settings.publish_timeout):
            text = await read()
        if text is None:
            return None
        value = json.loads(text)
        return value if isinstance(value, dict) else None

    async def retrying(self, operation: Callable[[], Awaitable[T]], *, what: str) -> T:
        """Run `operation` with a timeout per attempt and bounded, jittered exponential backoff."""
        settings = self.settings
        delay = settings.publish_backoff
        attempts = settings.publish_retries + 1
        for attempt in range(1, attempts + 1):
            try:
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation
                # that arrives as the operation finishes, and the caller would never stop.
                async with asyncio.timeout(settings.publish_timeout):
                    return await operation()
            except PROGRAMMING_ERRORS:
                raise
            except Exception as exc:
                if attempt == attempts:
                    raise PublishError(f"{what} failed after {attempts} attempts: {type(exc).__name__}") from exc
                self.publish_metrics.retries += 1
                logger.warning(
                    "%s failed (%s), attempt %d of %d; retrying in %.2fs",
                    what,
                    type(exc).__name__,
                    attempt,
                    attempts,
                    delay,
                    extra={
                        "dream_ws": {
                            "event": "publish_retry",
                            "what": what,
                            "error": type(exc).__name__,
                            "attempt": attempt,
                        }
                    },
                )
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, settings.publish_backoff_max)
        raise AssertionError("unreachable")

    # -- the reader -------------------------------------------------------------------------

    async def _wait_healthy(self) -> None:
        assert self._healthy is not None
        if self._healthy.is_set():
            return
        try:
            async with asyncio.timeout(self.settings.publish_timeout):
                await self._healthy.wait()
        except TimeoutError:
            raise BackendUnavailable("the groups backend is reconnecting") from None

    async def _read(self) -> None:
        try:
            while True:
                backend = self._backend
                assert backend is not None
                try:
                    event = await backend.next_published()
                except Exception as exc:
                    logger.warning("groups backend connection lost (%s); reconnecting", type(exc).__name__)
                    await self._reconnect()
                    continue
                self._receive(event)
        finally:
            if self._resubscriber is not None:
                await cancel_and_wait(self._resubscriber)
                self._resubscriber = None

    def _receive(self, event: Event) -> None:
        entry = self._groups.get(event.channel)
        if entry is None:
            return
        event_id = getattr(event, "id", None)
        if isinstance(event_id, str):
            if entry.backlog is not None:
                if len(entry.backlog) < MAX_BACKLOG:
                    entry.backlog.append(event)
                else:
                    logger.error("backlog of %s is full while catching up; dropped an event", event.channel)
                return
            if not entry.is_new(event_id):
                return  # already delivered by a catch-up
            entry.last_id = event_id
        try:
            decoded = json.loads(event.message)
        except (TypeError, ValueError, RecursionError):
            logger.warning("dropped a message on %s that is not JSON text", event.channel)
            return
        if isinstance(decoded, dict) and isinstance(decoded.get("type"), str):
            self._fan_out(event.channel, GroupEvent(decoded, event.message))
        else:
            logger.warning("dropped a message on %s without a string 'type'", event.channel)

    async def _reconnect(self) -> None:
        """Replace the lost backend connection, retrying with backoff until it is back."""
        assert self._healthy is not None and self._lock is not None
        self._healthy.clear()
        if self._resubscriber is not None:
            await cancel_and_wait(self._resubscriber)
            self._resubscriber = None
        delay = self.settings.reconnect_backoff
        async with self._lock:
            old, self._backend = self._backend, None
            if old is not None:
                await _quietly(old.disconnect())
            while True:
                try:
                    backend = self._factory(self.settings.broadcast_url)
                except Exception:
                    # A factory that cannot build a backend will not heal by itself; keep trying
                    # slowly rather than ending the reader and stranding every member.
                    logger.exception("cannot build the groups backend")
                    await asyncio.sleep(MAX_RECONNECT_DELAY)
                    continue
                try:
                    await backend.connect()
                except Exception as exc:
                    await _quietly(backend.disconnect())
                    logger.info("groups backend still unreachable (%s); next try in %.1fs", type(exc).__name__, delay)
                    await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                    delay = min(delay * 2, MAX_RECONNECT_DELAY)
                    continue
                self._backend = backend
                break
        # Subscribing again waits for confirmations that only this reader can read, so it runs
        # beside the reader rather than in it.
        assert self.loop is not None
        self._resubscriber = self.loop.create_task(self._resubscribe(), name="dream-ws layer resubscribe")

    async def _resubscribe(self) -> None:
        assert self._healthy is not None and self._lock is not None
        caught_up = 0
        try:
            async with self._lock:
                backend = self._backend
                assert backend is not None
                history = backend if keeps_history(backend) else None
                # Groups still queued are left to the subscriber, which makes them on this connection.
                groups = [(group, entry) for group, entry in self._groups.items() if entry.ready.is_set()]
                for start in range(0, len(groups), MAX_SUBSCRIBE_BATCH):
                    batch = groups[start : start + MAX_SUBSCRIBE_BATCH]
                    if history is not None:
                        for _, entry in batch:
                            # Hold live events while the missed ones are read, so that order is kept.
                            entry.backlog = []
                    await _in_one_go(backend, "subscribe", [group for group, _ in batch])
                    if history is None:
                        continue
                    for group, entry in batch:
                        missed = await history.history(group, entry.last_id)
                        backlog, entry.backlog = entry.backlog, None
                        for event in [*missed, *(backlog or ())]:
                            if self._groups.get(group) is entry:
                                before = entry.last_id
                                self._receive(event)
                                caught_up += entry.last_id != before
        except Exception as exc:
            # The reader sees the same failure on the connection and reconnects again.
            logger.warning("subscribing again failed (%s)", type(exc).__name__)
            return
        self.reconnects += 1
        self._healthy.set()
        logger.warning(
            "groups backend reconnected; %d groups subscribed again, %d missed events delivered",
            len(self._groups),
            caught_up,
        )


async def _in_one_go(backend: BroadcastBackend, operation: str, channels: list[str]) -> None:
    """`backend.subscribe_many(channels)` (or `unsubscribe_many`) where the backend batches
    them, as ours for Redis does; else the operation for each channel in turn."""
    many = getattr(backend, operation + "_many", None)
    if many is not None:
        await many(channels)
        return
    one = getattr(backend, operation)
    for channel in channels:
        await one(channel)


async def _quietly(awaitable: Awaitable[Any]) -> None:
    """Await clean-up whose failure must not hide what is being handled."""
    try:
        await awaitable
    except Exception as exc:
        logger.debug("ignored during clean-up: %s", type(exc).__name__)


async def cancel_and_wait(task: asyncio.Task[Any]) -> None:
    """Cancel a task we own and wait until it has ended, without raising its outcome."""
    task.cancel()
    await asyncio.wait({task})
