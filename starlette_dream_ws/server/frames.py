"""Client frames: the size limit, JSON text, one object each."""

from __future__ import annotations

import json
from typing import Any

from starlette.types import Message

from ..protocol import CloseCodes
from .connection import CloseConnection


class BadFrame(Exception):
    """A frame worth an `error` but not a close: the connection stays open."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def decode_frame(message: Message, limit: int) -> dict[str, Any]:
    """The JSON object in a `websocket.receive` message.

    Raises `CloseConnection` (1009) for a frame over `limit` bytes, `BadFrame` for anything
    else that is not one JSON object in a text frame.
    """
    text = message.get("text")
    if text is None:
        data = message.get("bytes") or b""
        if len(data) > limit:
            raise too_big(limit)
        raise BadFrame("binary_not_supported", "send JSON text frames")
    if len(text) > limit or len(text.encode()) > limit:
        raise too_big(limit)
    try:
        content = json.loads(text)
    except (ValueError, RecursionError):
        raise BadFrame("invalid_json", "the frame is not valid JSON") from None
    if not isinstance(content, dict):
        raise BadFrame("invalid_message", "each frame must be one JSON object")
    return content


def too_big(limit: int) -> CloseConnection:
    return CloseConnection(CloseCodes.MESSAGE_TOO_BIG, "message_too_big", f"frames are limited to {limit} bytes")
