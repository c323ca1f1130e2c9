"""The wire contract (docs/PROTOCOL.md): message shapes, statuses, close codes, group names.

Plain data and functions: no Starlette, no backend. The server, the groups layer and the
producers all speak through these names, so a message is shaped in exactly one place.
"""

from __future__ import annotations

import enum
import json
import time
from collections.abc import Sequence
from typing import Any

#: The subprotocol a client offers (and the server selects) to speak this protocol.
SUBPROTOCOL = "dream-ws.v1"
#: A token sent as a subprotocol: `dream-ws.bearer.<jwt>`, offered beside `SUBPROTOCOL`.
TOKEN_SUBPROTOCOL_PREFIX = "dream-ws.bearer."


class CloseCodes:
    """Close codes of the protocol."""

    NORMAL = 1000
    GOING_AWAY = 1001
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    TRY_AGAIN_LATER = 1013
    UNAUTHENTICATED = 4401
    FORBIDDEN = 4403
    HEARTBEAT_TIMEOUT = 4408


class ImageStatus(enum.StrEnum):
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    DELETE_PROCESSING = "delete_processing"
    DELETE_COMPLETED = "delete_completed"
    DELETE_FAILED = "delete_failed"


STATUSES = frozenset(status.value for status in ImageStatus)


def encode(message: dict[str, Any]) -> str:
    """A message as the compact JSON text that goes on the wire (and through the backends)."""
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False)


def error_message(code: str, message: str) -> dict[str, Any]:
    return {"type": "error", "code": code, "message": message}


def dream_group(dream_id: int) -> str:
    """The group every connection watching `dream_id` joins."""
    return f"dream_images_{dream_id}"


def image_update_message(
    dream_id: int,
    image_urls: Sequence[str] | None = None,
    status: str = "processing",
    message: str | None = None,
) -> dict[str, Any]:
    """Validate an update and build the `image_update` message clients receive.

    Raises `ValueError` (or `TypeError`) before anything is published.
    """
    if isinstance(dream_id, bool) or not isinstance(dream_id, int):
        raise TypeError(f"dream_id must be an int, got {type(dream_id).__name__}")
    if dream_id <= 0:
        raise ValueError(f"dream_id must be positive, got {dream_id}")
    status = str(status.value) if isinstance(status, ImageStatus) else status
    if status not in STATUSES:
        raise ValueError(f"status must be one of {sorted(STATUSES)}, got {status!r}")
    if isinstance(image_urls, str | bytes):
        raise TypeError("image_urls must be a list of URL strings, not one string")
    images = list(image_urls or ())
    if not all(isinstance(url, str) for url in images):
        raise TypeError("image_urls must be a list of URL strings")
    if message is not None and not isinstance(message, str):
        raise TypeError("message must be a string or None")
    return {
        "type": "image_update",
        "dream_id": dream_id,
        "status": status,
        "images": images,
        "timestamp": time.time(),
        "message": message,
    }
