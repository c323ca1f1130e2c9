"""Real-time dream image status over WebSockets, for any Starlette, FastAPI or ASGI app."""

from .app import ConsumerApp, DreamWebSocketApp
from .auth import (
    SUBPROTOCOL,
    TOKEN_SUBPROTOCOL_PREFIX,
    AuthenticationFailed,
    Authorizer,
    User,
    allow_any_authenticated_user,
)
from .consumer import CloseCodes, CloseConnection, Consumer, ConsumerContext
from .dreams import DreamImagesConsumer, ImageStatus, dream_group, image_update_message
from .layer import BackendUnavailable, GroupEvent, GroupLayer, PublishError
from .producers import asend_image_update, close_producers, send_image_update
from .settings import ConfigurationError, Settings

__version__ = "0.1.0"

__all__ = [
    "SUBPROTOCOL",
    "TOKEN_SUBPROTOCOL_PREFIX",
    "AuthenticationFailed",
    "Authorizer",
    "BackendUnavailable",
    "CloseCodes",
    "CloseConnection",
    "ConfigurationError",
    "Consumer",
    "ConsumerApp",
    "ConsumerContext",
    "DreamImagesConsumer",
    "DreamWebSocketApp",
    "GroupEvent",
    "GroupLayer",
    "ImageStatus",
    "PublishError",
    "Settings",
    "User",
    "allow_any_authenticated_user",
    "asend_image_update",
    "close_producers",
    "dream_group",
    "image_update_message",
    "send_image_update",
]
