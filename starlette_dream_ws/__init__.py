"""Real-time dream image status over WebSockets, for any Starlette, FastAPI or ASGI app.

Three areas: `protocol` (the wire contract), `groups` (membership, fan-out, backends) and
`server` (the mountable app and its consumers), plus `producers`. Names are exported lazily,
so `from starlette_dream_ws import send_image_update` in a Celery worker loads no server code.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Each public name and the module that defines it.
_EXPORTS = {
    "SUBPROTOCOL": "protocol",
    "TOKEN_SUBPROTOCOL_PREFIX": "protocol",
    "CloseCodes": "protocol",
    "ImageStatus": "protocol",
    "dream_group": "protocol",
    "image_update_message": "protocol",
    "job_group": "protocol",
    "ConfigurationError": "settings",
    "Settings": "settings",
    "BackendUnavailable": "groups",
    "GroupEvent": "groups",
    "GroupLayer": "groups",
    "PublishError": "groups",
    "asend_image_update": "producers",
    "aclose_producers": "producers",
    "apublish": "producers",
    "publish": "producers",
    "close_producers": "producers",
    "send_image_update": "producers",
    "AuthenticationFailed": "server.auth",
    "Authenticator": "server.auth",
    "Authorizer": "server.auth",
    "User": "server.auth",
    "allow_any_authenticated_user": "server.auth",
    "CloseConnection": "server.connection",
    "ConnectionState": "server.connection",
    "Consumer": "server.consumer",
    "ConsumerContext": "server.context",
    "ConsumerApp": "server.app",
    "DreamImagesConsumer": "server.dreams",
    "JobConsumer": "server.jobs",
    "DreamWebSocketApp": "server.dreams",
}

__all__ = [
    "SUBPROTOCOL",
    "TOKEN_SUBPROTOCOL_PREFIX",
    "AuthenticationFailed",
    "Authenticator",
    "Authorizer",
    "BackendUnavailable",
    "CloseCodes",
    "CloseConnection",
    "ConfigurationError",
    "ConnectionState",
    "Consumer",
    "ConsumerApp",
    "ConsumerContext",
    "DreamImagesConsumer",
    "DreamWebSocketApp",
    "GroupEvent",
    "GroupLayer",
    "ImageStatus",
    "JobConsumer",
    "PublishError",
    "Settings",
    "User",
    "aclose_producers",
    "allow_any_authenticated_user",
    "apublish",
    "asend_image_update",
    "close_producers",
    "dream_group",
    "image_update_message",
    "job_group",
    "publish",
    "send_image_update",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # found once
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


if TYPE_CHECKING:
    from .groups import BackendUnavailable, GroupEvent, GroupLayer, PublishError
    from .producers import (
        aclose_producers,
        apublish,
        asend_image_update,
        close_producers,
        publish,
        send_image_update,
    )
    from .protocol import (
        SUBPROTOCOL,
        TOKEN_SUBPROTOCOL_PREFIX,
        CloseCodes,
        ImageStatus,
        dream_group,
        image_update_message,
        job_group,
    )
    from .server.app import ConsumerApp
    from .server.auth import AuthenticationFailed, Authenticator, Authorizer, User, allow_any_authenticated_user
    from .server.connection import CloseConnection, ConnectionState
    from .server.consumer import Consumer
    from .server.context import ConsumerContext
    from .server.dreams import DreamImagesConsumer, DreamWebSocketApp
    from .server.jobs import JobConsumer
    from .settings import ConfigurationError, Settings
