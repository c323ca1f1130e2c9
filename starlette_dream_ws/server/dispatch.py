"""`type` dispatch, as in Channels: a message's type names the method that handles it.

* a client frame `{"type": "ping"}` calls `receive_ping(self, content)`;
* a group event `{"type": "image_update"}` (or `"image.update"`) calls `image_update(self, event)`.

Client messages get the `receive_` prefix so that no client can reach an event handler or a
life-cycle method by naming it.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any

from ..protocol import TYPE_NAME

CLIENT_PREFIX = "receive_"
EVENT_PREFIX = ""

#: Handler names found per (consumer class, prefix, type), so that a message's type is checked
#: and mapped once per process rather than once per connection.
_names: dict[tuple[type, str, str], str | None] = {}
#: Types come from clients: the cache is bounded.
MAX_CACHED_HANDLERS = 4096

Handler = Callable[[dict[str, Any]], Awaitable[None]]


def handler_name(prefix: str, kind: str, reserved: type) -> str | None:
    """The method name for a message `kind`, or None if it names nothing a message may reach.

    Nobody reaches a method of `reserved` (the base class: its life-cycle API, `receive_json`
    included) by naming it, and events may not call client handlers.
    """
    if not TYPE_NAME.fullmatch(kind):
        return None
    name = prefix + kind.replace(".", "_")
    if hasattr(reserved, name) or (prefix == EVENT_PREFIX and name.startswith(CLIENT_PREFIX)):
        return None
    return name


def find_handler(target: object, prefix: str, kind: str, reserved: type) -> Handler | None:
    """The bound method of `target` that handles a message `kind`, or None."""
    key = (type(target), prefix, kind)
    try:
        name = _names[key]
    except KeyError:
        name = handler_name(prefix, kind, reserved)
        # Only coroutine methods handle messages: an event named after a sync helper
        # (`greeting`, `check_job_id`) must not call it.
        if name is not None and not inspect.iscoroutinefunction(getattr(type(target), name, None)):
            name = None
        if len(_names) < MAX_CACHED_HANDLERS:
            _names[key] = name
    if name is None:
        return None
    handler = getattr(target, name, None)
    return handler if callable(handler) else None
