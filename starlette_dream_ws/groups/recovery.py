"""After a lost backend connection: connect again, subscribe again, deliver what was missed.

The same hand-over serves every group: live events are held while the missed ones are read
from the backend's history, then both are delivered in order, each once.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import TYPE_CHECKING

from ..tasks import quietly
from .subscriptions import MAX_BATCH

if TYPE_CHECKING:
    from .contract import Backend
    from .layer import GroupLayer

logger = logging.getLogger("starlette_dream_ws.layer")

#: Longest pause between two attempts to reconnect a lost backend, in seconds.
MAX_RECONNECT_DELAY = 1.0


async def reconnect(layer: GroupLayer) -> Backend:
    """Replace the lost backend connection, retrying with backoff until it is back (under the
    layer's lock, so nothing is subscribed or published on a half-made connection)."""
    delay = layer.settings.reconnect_backoff
    async with layer.lock:
        old, layer.backend = layer.backend, None
        if old is not None:
            await quietly(old.disconnect())
        while True:
            try:
                backend = layer.build_backend()
            except Exception:
                # A factory that cannot build a backend will not heal by itself; keep trying
                # slowly rather than ending the reader and stranding every member.
                logger.exception("cannot build the groups backend")
                await asyncio.sleep(MAX_RECONNECT_DELAY)
                continue
            try:
                await backend.connect()
            except Exception as exc:
                await quietly(backend.disconnect())
                logger.info("groups backend still unreachable (%s); next try in %.1fs", type(exc).__name__, delay)
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, MAX_RECONNECT_DELAY)
                continue
            layer.backend = backend
            return backend


async def resubscribe(layer: GroupLayer) -> None:
    """Subscribe every group with members again, in batches, and catch each one up.

    Runs beside the reader, whose reads deliver the confirmations it waits for.
    """
    caught_up = 0
    try:
        async with layer.lock:
            backend = layer.backend
            assert backend is not None
            # Groups still queued are left to the subscriber, which makes them on this connection.
            groups = [(name, group) for name, group in layer.groups.items() if group.ready.is_set()]
            for start in range(0, len(groups), MAX_BATCH):
                batch = groups[start : start + MAX_BATCH]
                for _, group in batch:
                    # Hold live events while the missed ones are read, so that order is kept.
                    group.backlog = []
                await backend.subscribe([name for name, _ in batch])
                for name, group in batch:
                    history = await backend.history(name, group.position)
                    if layer.groups.get(name) is group:
                        caught_up += group.catch_up(history)
                    else:
                        group.backlog = None
    except Exception as exc:
        # The reader sees the same failure on the connection and reconnects again.
        logger.warning("subscribing again failed (%s)", type(exc).__name__)
        return
    layer.reconnected()
    logger.warning(
        "groups backend reconnected; %d groups subscribed again, %d missed events delivered",
        len(layer.groups),
        caught_up,
    )
