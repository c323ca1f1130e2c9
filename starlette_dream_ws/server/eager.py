"""Start a coroutine at once and give it a task only if it has to wait (an "eager" task).

A fan-out to a thousand connections would otherwise create a thousand tasks per message,
although nearly every send completes without waiting (the socket takes it). Python 3.12 has
a form of this built in (`asyncio.eager_task_factory`), but it still makes a task for every
call, and 3.11 is supported; so this is the same idea for the only case we need: run the
coroutine until it first waits, and only then hand the rest of it to a task.

What the coroutine yields when it waits is the event loop's business, not ours: an asyncio
future, a bare `None`, or a server's own future-like object (Granian's `send` yields a Rust
future that only mimics asyncio's). So the task is handed exactly what the coroutine yielded,
as if it had driven the coroutine from the start, and passes back whatever it sends or throws.
"""

from __future__ import annotations

import asyncio
import contextvars
import types
from collections.abc import Coroutine, Generator
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


@types.coroutine
def _hand_over(yielded: Any) -> Generator[Any, Any, Any]:
    """Yield `yielded` to the task unchanged and return what the task sends back.

    Awaiting the object a second time instead is not the same for every future: asyncio's arms
    itself for the task on each `await`, Granian's only once, when it is made. Awaited again,
    Granian's reached the task unarmed, and the task threw "yield was used instead of yield
    from" into the send, which took it for a client gone away and stopped sending."""
    return (yield yielded)


async def _resume(coroutine: Coroutine[Any, Any, None], waiting_for: Any) -> None:
    """The rest of `coroutine`, driven as `await` would drive it, from its first wait on."""
    while True:
        try:
            sent = await _hand_over(waiting_for)
        except BaseException as exc:  # its failure, or this task's cancellation: the coroutine's now
            try:
                waiting_for = coroutine.throw(exc)
            except StopIteration:
                return
            continue
        try:
            waiting_for = coroutine.send(sent)
        except StopIteration:
            return
