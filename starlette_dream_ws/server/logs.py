"""Structured log events of connections: one line each, never with a token."""

from __future__ import annotations

import logging
from typing import Any

from starlette.types import Scope

logger = logging.getLogger("starlette_dream_ws.consumer")


def log_event(scope: Scope, user_id: str | None, event: str, level: int = logging.INFO, **fields: Any) -> None:
    """`event key=value ...`, the fields also in `record.dream_ws` for JSON log handlers.

    Paths come without their query string (where a token may be), users by id.
    """
    if not logger.isEnabledFor(level):
        return
    fields = {"path": scope.get("path"), **fields}
    if user_id is not None:
        fields.setdefault("user", user_id)
    text = " ".join(f"{key}={value}" for key, value in fields.items())
    logger.log(level, "%s %s", event, text, extra={"dream_ws": {"event": event, **fields}})
