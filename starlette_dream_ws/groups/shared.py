"""The groups layers of the apps running in this process, by broadcast URL.

An app registers its layer when it starts, so that producers called in the same process
(a sync endpoint, a thread pool, `asend_image_update` in a handler) publish through the
app's connection instead of opening their own.
"""

from __future__ import annotations

import threading
import weakref

from ..settings import Settings
from .layer import GroupLayer

_layers: dict[str, GroupLayer] = {}
#: The layers of the apps created in this process, started or not (weakly: an app that is
#: gone no longer counts).
_declared: weakref.WeakSet[GroupLayer] = weakref.WeakSet()
_lock = threading.Lock()


def register(layer: GroupLayer) -> None:
    with _lock:
        _layers[layer.settings.broadcast_url] = layer


def declare(layer: GroupLayer) -> None:
    """An app with this layer exists in this process (it may not have started yet)."""
    with _lock:
        _declared.add(layer)


def declared(url: str) -> bool:
    """Whether an app on `url` was created in this process: a process-local backend (memory://)
    then has someone to deliver to, even before the app's first connection."""
    with _lock:
        return any(layer.settings.broadcast_url == url for layer in _declared)


def only_declared() -> Settings | None:
    """The settings of the apps created in this process, if they all use one URL."""
    with _lock:
        layers = list(_declared)
    if not layers or len({layer.settings.broadcast_url for layer in layers}) > 1:
        return None
    return layers[0].settings


def unregister(layer: GroupLayer) -> None:
    with _lock:
        if _layers.get(layer.settings.broadcast_url) is layer:
            del _layers[layer.settings.broadcast_url]


def _prune() -> None:
    for url, layer in list(_layers.items()):
        if layer.loop is None or layer.loop.is_closed():
            del _layers[url]


def only_layer() -> GroupLayer | None:
    """The layer of the one app in this process, if there is exactly one."""
    with _lock:
        _prune()
        return next(iter(_layers.values())) if len(_layers) == 1 else None


def find(settings: Settings) -> GroupLayer | None:
    """The layer of an app of this process on `settings.broadcast_url`, if any."""
    with _lock:
        _prune()
        return _layers.get(settings.broadcast_url)


def find_running(settings: Settings | None) -> GroupLayer | None:
    """The layer a call with `settings` would use (as `only_layer`/`find`), if its loop runs."""
    layer = only_layer() if settings is None else find(settings)
    if layer is None or layer.loop is None or not layer.loop.is_running():
        return None
    return layer
