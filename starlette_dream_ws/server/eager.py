"""Start a coroutine at once and give it a task only if it has to wait (an "eager" task).

A fan-out to a thousand connections would otherwise create a thousand tasks per message,
although nearly every send completes without waiting (the socket takes it). Python 3.12 has
this built in (`asyncio.eager_task_factory`); 3.11 does not, so this is the same idea for the
only case we need: run the coroutine until it first waits, and only then hand the rest of it
to a task that waits for what it was waiting for and resumes it.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Coroutine
from typing import Any


def start_eagerly(coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None] | None:
    """Run `coroutine` now, in a copy of the current context; None if it finished without
    waiting, else the task that runs the rest of it (cancel that to cancel the coroutine)."""
    context = contextvars.copy_context()
    try:
        waiting_for = context.run(coroutine.send, None)
    except StopIteration:
        return None
    except BaseException:
        coroutine.close()
        raise
    task = asyncio.get_running_loop().create_task(_resume(coroutine, waiting_for), context=context)
    # A task cancelled before its first step never runs `_resume`: close the coroutine then, so
    # that its cleanup (finally blocks) runs as it would have.
    task.add_done_callback(lambda _: coroutine.close())
    return task


async def _resume(coroutine: Coroutine[Any, Any, None], waiting_for: Any) -> None:
    while True:
        try:
            if waiting_for is None:  # a bare yield, as `asyncio.sleep(0)` makes
                await asyncio.sleep(0)
            else:
                # Take the future as a task takes what its coroutine yields: clear the flag the
                # coroutine's `await` set (a future refuses a second await while it is set).
                waiting_for._asyncio_future_blocking = False
                await waiting_for
        except BaseException as exc:  # its failure, or this task's cancellation: the coroutine's now
            try:
                waiting_for = coroutine.throw(exc)
            except StopIteration:
                return
            continue
        try:
            waiting_for = coroutine.send(None)
        except StopIteration:
            return
