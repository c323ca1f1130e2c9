"""Publishing updates from any process: the server's own code, threads, Celery workers.

Depends on `protocol`, `groups` and `settings` only: a Celery worker that publishes loads no
server code. `apublish(group, event)` publishes any event to any group on the current loop;
`asend_image_update` is its form for dreams. `publish` and `send_image_update` are for sync code:

* in a thread of a process that serves the app (a sync endpoint, a thread pool), it hands
  the publish to the app's loop, reusing the app's backend connection;
* in a process with no app (a Celery worker, a script), it keeps one background thread with
  an event loop and one backend connection for the life of the process;
* in a running event loop's own thread it refuses: blocking there would stall the loop.

With `connection=` (the app's database connection or session, inside its transaction), any
of them writes the update in that transaction instead, on PostgreSQL, so that it reaches
browsers only if the transaction commits (`transactional`); the sync forms then run in the
calling thread, on that connection.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import functools
import os
import selectors
import threading
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, cast

from . import transactional
from .groups import GroupLayer, shared
from .groups.backends import create_blocking_publisher, is_process_local
from .groups.publishing import retrying_blocking
from .protocol import check_event, check_group, dream_group, encode, image_update_message
from .settings import Settings, env_settings

if TYPE_CHECKING:
    from .groups.contract import BlockingPublisher

T = TypeVar("T")
P = ParamSpec("P")

_lock = threading.Lock()


def _resolve(settings: Settings | None) -> tuple[Settings, GroupLayer | None]:
    """The settings a call publishes with, and the layer of an app of this process on them.

    Without `settings`, the one app of this process decides, started or not (the environment
    is read only when there is none, once per call).
    """
    if settings is None:
        layer = shared.only_layer()
        if layer is not None:
            return layer.settings, layer
        # An app not started yet (mounted, before its first connection) still decides.
        settings = shared.only_declared() or env_settings()
    return settings, shared.find(settings)


def _refuse_lone_memory(settings: Settings) -> None:
    if is_process_local(settings.broadcast_url) and not shared.declared(settings.broadcast_url):
        raise RuntimeError(
            f"{settings.broadcast_url} only reaches connections served by this process, and this "
            "process serves no app: set DREAM_WS_BROADCAST_URL (the broadcast_url setting) to the "
            "redis:// or postgresql:// URL the servers use"
        )


async def apublish(
    group: str, event: Mapping[str, Any], *, settings: Settings | None = None, connection: object | None = None
) -> None:
    """Publish `event` (a JSON object with a `type`) to every member of `group`, in every
    process, and keep it as the group's latest state.

    Without `settings`, uses the app running in this process, else `DREAM_WS_*` variables.
    Retries with backoff, then raises `PublishError`; `ValueError`/`TypeError` for a bad group
    name or event, before anything is sent. With `connection` (an async psycopg, asyncpg or
    SQLAlchemy connection or session, in its transaction), writes it in that transaction:
    delivered only if it commits, never retried (see `transactional`).
    """
    await _apublish(group, _checked(group, event), settings, connection)


async def _apublish(group: str, content: dict[str, Any], settings: Settings | None, connection: object | None) -> None:
    """What both async producers do with a validated message: in the caller's transaction, or
    through the layer of this process (or of this loop)."""
    settings, layer = _resolve(settings)
    if connection is not None:
        await transactional.apublish_in_transaction(connection, group, content, settings=settings)
        return
    await _publish(settings, layer, group, content)


def _checked(group: str, event: Mapping[str, Any]) -> dict[str, Any]:
    check_group(group)
    return check_event(event)


async def asend_image_update(
    dream_id: int,
    image_urls: Sequence[str] | None = None,
    status: str = "processing",
    message: str | None = None,
    progress: int | None = None,
    *,
    settings: Settings | None = None,
    connection: object | None = None,
) -> None:
    """Publish an `image_update` to everyone watching `dream_id`, and record it as the latest.

    `progress` (0-100) is optional. Without `settings`, uses the app running in this process,
    else `DREAM_WS_*` variables. Retries with backoff, then raises `PublishError`; `ValueError`
    (or `TypeError`) for a bad argument, before anything is sent. With `connection`, writes it
    in that connection's transaction, as `apublish` does.
    """
    await _apublish(*_image_update(dream_id, image_urls, status, message, progress), settings, connection)


def blocking(
    publish: Callable[P, Coroutine[Any, Any, None]], name: str, prepare: Callable[..., tuple[str, dict[str, Any]]]
) -> Callable[P, None]:
    """The sync form of an async publisher (which takes a keyword `settings`), for Celery
    tasks, threads and scripts. `prepare` validates the arguments (but `settings`) and gives
    the group and the message, before anything else happens. Then:

    * an app of this process running in another thread publishes it (on its connection);
    * on Redis (and on PostgreSQL with psycopg), the calling thread publishes on its own sync
      connection (about one round trip of CPU, no loop involved);
    * otherwise the process's background loop publishes it, and the call waits.

    With `connection`, the calling thread writes it on that connection, in its transaction.
    """

    @functools.wraps(publish)
    def run(*args: P.args, **kwargs: P.kwargs) -> None:
        settings = cast("Settings | None", kwargs.pop("settings", None))
        connection = kwargs.pop("connection", None)
        group, content = prepare(*args, **kwargs)
        if connection is not None:
            # The caller's transaction lives on its connection, in this thread: never on a loop.
            resolved = _resolve(settings)[0]
            transactional.publish_in_transaction(connection, group, content, settings=resolved)
            return
        _refuse_in_loop_thread(publish.__name__)
        layer = shared.find_running(settings)
        if layer is not None and layer.loop is not None:
            asyncio.run_coroutine_threadsafe(layer.publish(group, content), layer.loop).result()
            return
        # Given settings, `find_running` has just looked for an app's layer on them: none runs.
        resolved, layer = (settings, None) if settings is not None else _resolve(None)
        publisher = _blocking_publisher(resolved) if layer is None else None
        if publisher is not None:
            text = encode(content)
            retrying_blocking(
                lambda: publisher.publish(group, text), resolved, publisher.metrics, what=f"publish to {group}"
            )
            return
        _background_loop().run(_publish(resolved, layer, group, content))

    run.__name__ = run.__qualname__ = name
    run.__doc__ = f"The sync form of `{publish.__name__}`, for Celery tasks, threads and scripts."
    return run


def _image_update(
    dream_id: int,
    image_urls: Sequence[str] | None = None,
    status: str = "processing",
    message: str | None = None,
    progress: int | None = None,
) -> tuple[str, dict[str, Any]]:
    return dream_group(dream_id), image_update_message(dream_id, image_urls, status, message, progress)


def _event(group: str, event: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    return group, _checked(group, event)


send_image_update = blocking(asend_image_update, "send_image_update", prepare=_image_update)
publish = blocking(apublish, "publish", prepare=_event)


# -- sync connections of the backends that have them ------------------------------------------

#: This process's sync publishers, by the settings they publish with (None: the backend has none).
_blocking_publishers: dict[tuple[str, float, int, float], BlockingPublisher | None] = {}


def _blocking_publisher(settings: Settings) -> BlockingPublisher | None:
    """The sync publisher for `settings` if its backend has one (Redis; PostgreSQL with psycopg),
    made on first use and again in a forked child."""
    key = (settings.broadcast_url, settings.state_ttl, settings.history_size, settings.publish_timeout)
    publisher = _blocking_publishers.get(key, _UNKNOWN)
    if _stale(publisher):
        with _lock:
            # Looked at again under the lock: threads that start together make one publisher.
            publisher = _blocking_publishers.get(key, _UNKNOWN)
            if _stale(publisher):
                publisher = _blocking_publishers[key] = create_blocking_publisher(settings)
    return cast("BlockingPublisher | None", publisher)


def _stale(publisher: Any) -> bool:
    """Not made yet, or made by the parent of this forked process."""
    return publisher is _UNKNOWN or (publisher is not None and publisher.pid != os.getpid())


_UNKNOWN: Any = object()


def _refuse_in_loop_thread(async_name: str) -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise RuntimeError(
        f"the sync form of {async_name}() cannot be called from a running event loop's thread: "
        f"it would block the loop. Use 'await {async_name}(...)' there instead."
    )


async def _publish(settings: Settings, layer: GroupLayer | None, group: str, message: dict[str, Any]) -> None:
    loop = asyncio.get_running_loop()
    if layer is not None and layer.loop is not None and layer.loop is not loop and layer.loop.is_running():
        future = asyncio.run_coroutine_threadsafe(layer.publish(group, message), layer.loop)
        await asyncio.wrap_future(future)
        return
    if layer is None:
        _refuse_lone_memory(settings)
        layer = _loop_layer(settings, loop)
    await layer.publish(group, message)


# -- per-loop layers for producers outside an app ------------------------------------------

#: Publishing layers of this process outside any app, one per event loop and URL: each is
#: disconnected by `close_producers()` (or `aclose_producers()` on its own loop).
_loop_layers: dict[tuple[int, str], tuple[asyncio.AbstractEventLoop, GroupLayer]] = {}


def _loop_layer(settings: Settings, loop: asyncio.AbstractEventLoop) -> GroupLayer:
    """One publishing layer per loop and URL, so calls share a backend connection."""
    with _lock:
        for key, (known, _) in list(_loop_layers.items()):
            if known.is_closed():
                # The loop's end cancelled the layer's tasks; its sockets go with the objects.
                del _loop_layers[key]
        key = (id(loop), settings.broadcast_url)
        entry = _loop_layers.get(key)
        if entry is None or entry[0] is not loop:
            entry = _loop_layers[key] = (loop, GroupLayer(settings))
        return entry[1]


def _take_loop_layers(
    loop: asyncio.AbstractEventLoop | None = None,
) -> list[tuple[asyncio.AbstractEventLoop, GroupLayer]]:
    with _lock:
        taken = [(key, entry) for key, entry in _loop_layers.items() if loop is None or entry[0] is loop]
        for key, _ in taken:
            del _loop_layers[key]
        return [entry for _, entry in taken]


async def aclose_producers() -> None:
    """Disconnect the publishing layers this process opened on the running loop (call it
    before `asyncio.run(...)` returns, to close their connections cleanly)."""
    for _, layer in _take_loop_layers(asyncio.get_running_loop()):
        await layer.disconnect()


class _BackgroundLoop:
    """An event loop in a daemon thread, owning this process's sync producer connections."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        # poll, not epoll: a forked child shares the parent's epoll object, and when the child
        # exits, cleaning up the inherited sockets would unregister them from the parent's loop.
        self.loop: asyncio.AbstractEventLoop = asyncio.SelectorEventLoop(selectors.PollSelector())
        self._thread = threading.Thread(target=self.loop.run_forever, name="dream-ws producer", daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        future: concurrent.futures.Future[T] = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        return future.result()

    def close(self) -> None:
        if self.loop.is_running():
            asyncio.run_coroutine_threadsafe(aclose_producers(), self.loop).result(timeout=5)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=5)
        if not self.loop.is_running():
            self.loop.close()


_background: _BackgroundLoop | None = None


def _background_loop() -> _BackgroundLoop:
    global _background
    with _lock:
        # A forked child (Celery's prefork pool) inherits no running thread: start its own.
        if _background is None or _background.pid != os.getpid():
            _background = _BackgroundLoop()
        return _background


@atexit.register
def close_producers() -> None:
    """Disconnect the producer connections of this process (also run at exit).

    Layers on loops still running in other threads are disconnected on their loops; those
    of loops that have ended are dropped (the loop's end cancelled their tasks).
    """
    global _background
    with _lock:
        background, _background = _background, None
        publishers = [publisher for publisher in _blocking_publishers.values() if publisher is not None]
        _blocking_publishers.clear()
    for publisher in publishers:
        publisher.close()
    if background is not None and background.pid == os.getpid():
        background.close()
    try:
        current = asyncio.get_running_loop()
    except RuntimeError:
        current = None
    for loop, layer in _take_loop_layers():
        if loop is current:
            # Blocking here would stall the very loop that must do the work.
            with _lock:
                _loop_layers[(id(loop), layer.settings.broadcast_url)] = (loop, layer)
        elif loop.is_running() and not loop.is_closed():
            with contextlib.suppress(concurrent.futures.TimeoutError, RuntimeError):
                asyncio.run_coroutine_threadsafe(layer.disconnect(), loop).result(timeout=5)
