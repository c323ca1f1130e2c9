"""Ending tasks we own: one way to cancel and wait, one way to clean up quietly."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any

logger = logging.getLogger("starlette_dream_ws")


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel a task we own and wait until it has ended, without raising its outcome."""
    if task is None or task is asyncio.current_task():
        return
    task.cancel()
    await asyncio.wait({task})


async def quietly(awaitable: Awaitable[Any]) -> None:
    """Await clean-up whose failure must not hide what is being handled."""
    try:
        await awaitable
    except Exception as exc:
        logger.debug("ignored during clean-up: %s", type(exc).__name__)
