"""Publishing updates from any process: the server's own code, threads, Celery workers.

`asend_image_update` publishes on the current loop. `send_image_update` is for sync code:

* in a thread of a process that serves the app (a sync endpoint, a thread pool), it hands
  the publish to the app's loop, reusing the app's backend connection;
* in a process with no app (a Celery worker, a script), it keeps one background thread with
  an event loop and one backend connection for the life of the process;
* in a running event loop's own thread it refuses: blocking there would stall the loop.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import os
import selectors
import threading
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

from .dreams import dream_group, image_update_message
from .layer import GroupLayer
from .settings import Settings

T = TypeVar("T")

# Layers of apps that are connected in this process, by broadcast URL: producers reuse them.
_app_layers: dict[str, GroupLayer] = {}
_lock = threading.Lock()


def register_app_layer(layer: GroupLayer) -> None:
    with _lock:
        _app_layers[layer.settings.broadcast_url] = layer


def unregister_app_layer(layer: GroupLayer) -> None:
    with _lock:
        if _app_layers.get(layer.settings.broadcast_url) is layer:
            del _app_layers[layer.settings.broadcast_url]


def _app_layer(settings: Settings | None) -> GroupLayer | None:
    with _lock:
        for url, layer in list(_app_layers.items()):
            if layer.loop is None or layer.loop.is_closed():
                del _app_layers[url]
        if settings is None and len(_app_layers) == 1:
            return next(iter(_app_layers.values()))
        url = (settings or Settings.from_env()).broadcast_url
        return _app_layers.get(url)


def _resolve(settings: Settings | None) -> Settings | None:
    """The settings a call publishes with, read from the environment once per call at most.

    None stays None when this process runs exactly one app: its layer is used.
    """
    if settings is not None:
        return settings
    with _lock:
        if len(_app_layers) == 1:
            return None
    return Settings.from_env()


def _refuse_lone_memory(settings: Settings) -> None:
    if settings.broadcast_url.startswith("memory:"):
        raise RuntimeError(
            "memory:// only reaches connections served by this process, and no app is running here: "
            "set DREAM_WS_BROADCAST_URL to a redis:// URL shared with the server"
        )


async def asend_image_update(
    dream_id: int,
    image_urls: Sequence[str] | None = None,
    status: str = "processing",
    message: str | None = None,
    *,
    settings: Settings | None = None,
) -> None:
    """Publish an `image_update` to everyone watching `dream_id`, and record it as the latest.

    Without `settings`, uses the app running in this process, else `DREAM_WS_*` variables.
    Retries with backoff, then raises `PublishError`; `ValueError` for a bad status.
    """
    update = image_update_message(dream_id, image_urls, status, message)
    settings = _resolve(settings)
    await _publish_async(settings, dream_group(dream_id), update)


def send_image_update(
    dream_id: int,
    image_urls: Sequence[str] | None = None,
    status: str = "processing",
    message: str | None = None,
    *,
    settings: Settings | None = None,
) -> None:
    """The sync form of `asend_image_update`, for Celery tasks, threads and scripts."""
    update = image_update_message(dream_id, image_urls, status, message)
    settings = _resolve(settings)
    _run_sync(settings, _publish_async(settings, dream_group(dream_id), update))


async def _publish_async(settings: Settings | None, group: str, message: dict[str, Any]) -> None:
    layer = _app_layer(settings)
    loop = asyncio.get_running_loop()
    if layer is not None and layer.loop is not None and layer.loop is not loop and layer.loop.is_running():
        future = asyncio.run_coroutine_threadsafe(layer.publish(group, message, remember=True), layer.loop)
        await asyncio.wrap_future(future)
        return
    if layer is None:
        resolved = settings or Settings.from_env()
        _refuse_lone_memory(resolved)
        layer = _loop_layer(resolved, loop)
    await layer.publish(group, message, remember=True)


def _run_sync(settings: Settings | None, coroutine: Coroutine[Any, Any, T]) -> T:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        coroutine.close()
        raise RuntimeError(
            "send_image_update() cannot be called from a running event loop's thread: "
            "it would block the loop. Use 'await asend_image_update(...)' there instead."
        )
    layer = _app_layer(settings)
    if layer is not None and layer.loop is not None and layer.loop.is_running():
        return asyncio.run_coroutine_threadsafe(coroutine, layer.loop).result()
    try:
        _refuse_lone_memory(settings or Settings.from_env())
    except RuntimeError:
        coroutine.close()
        raise
    return _background_loop().run(coroutine)


# -- per-loop layers for producers outside an app ------------------------------------------

_loop_layers: dict[tuple[int, str], tuple[asyncio.AbstractEventLoop, GroupLayer]] = {}


def _loop_layer(settings: Settings, loop: asyncio.AbstractEventLoop) -> GroupLayer:
    """One publishing layer per loop and URL, so calls share a backend connection."""
    for key, (known, _) in list(_loop_layers.items()):
        if known.is_closed():
            del _loop_layers[key]
    key = (id(loop), settings.broadcast_url)
    entry = _loop_layers.get(key)
    if entry is None or entry[0] is not loop:
        entry = _loop_layers[key] = (loop, GroupLayer(settings))
    return entry[1]


class _BackgroundLoop:
    """An event loop in a daemon thread, owning this process's producer connections."""

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
        async def disconnect_all() -> None:
            for key, (loop, layer) in list(_loop_layers.items()):
                if loop is self.loop:
                    del _loop_layers[key]
                    await layer.disconnect()

        if self.loop.is_running():
            asyncio.run_coroutine_threadsafe(disconnect_all(), self.loop).result(timeout=5)
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
    """Disconnect the producer connections of this process (also run at exit)."""
    global _background
    with _lock:
        background, _background = _background, None
    if background is not None and background.pid == os.getpid():
        background.close()
