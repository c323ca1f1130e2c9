"""start_eagerly: run now, and only what has to wait gets a task, with task semantics kept."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable, Generator
from typing import Any, cast

import pytest

from starlette_dream_ws.server.eager import start_eagerly

pytestmark = pytest.mark.anyio

where: contextvars.ContextVar[str] = contextvars.ContextVar("where", default="caller")


async def test_a_coroutine_that_never_waits_runs_to_the_end_at_once_without_a_task() -> None:
    done: list[str] = []

    async def quick() -> None:
        done.append("ran")

    assert start_eagerly(quick()) is None
    assert done == ["ran"]


async def test_a_coroutine_that_waits_is_finished_by_a_task_with_what_it_waited_for() -> None:
    steps: list[object] = []
    future: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def waits() -> None:
        steps.append("before")
        steps.append(await future)
        await asyncio.sleep(0)  # a bare yield on the way
        steps.append("after")

    task = start_eagerly(waits())
    assert task is not None and steps == ["before"]  # ran up to the wait, synchronously
    future.set_result(42)
    await task
    assert steps == ["before", 42, "after"]


class ForeignFuture:
    """A future that is not asyncio's, as Granian's `send` returns (a Rust future): its own
    iterator, marked as blocking once when made rather than by each `await` of it, reporting
    its end through done callbacks. The event loop's tasks accept it as a future."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        # What makes a task wait for it (`asyncio.isfuture`'s protocol); set here only, never
        # again by `__next__`, exactly as Granian does.
        self._asyncio_future_blocking = True
        self._callbacks: list[tuple[Callable[[Any], object], contextvars.Context | None]] = []
        self._state = "pending"
        self._result: object = None

    def __await__(self) -> Generator[Any, Any, Any]:
        # Its own iterator, not a generator (no `send`): what `await` needs is `__next__`.
        return cast("Generator[Any, Any, Any]", self)

    def __iter__(self) -> ForeignFuture:
        return self

    def __next__(self) -> ForeignFuture:
        if self._state == "done":
            raise StopIteration(self._result)
        if self._state == "cancelled":
            raise asyncio.CancelledError
        return self

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def add_done_callback(
        self, callback: Callable[[Any], object], *, context: contextvars.Context | None = None
    ) -> None:
        if self._state == "pending":
            self._callbacks.append((callback, context))
        else:
            self._loop.call_soon(callback, self, context=context)

    def remove_done_callback(self, callback: Callable[[Any], object]) -> int:
        self._callbacks = [(cb, ctx) for cb, ctx in self._callbacks if cb != callback]
        return 1

    def done(self) -> bool:
        return self._state != "pending"

    def cancelled(self) -> bool:
        return self._state == "cancelled"

    def result(self) -> object:
        if self._state == "cancelled":
            raise asyncio.CancelledError
        return self._result

    def exception(self) -> BaseException | None:
        return None

    def set_result(self, value: object) -> None:
        self._result = value
        self._finish("done")

    def cancel(self, msg: object = None) -> bool:
        if self._state != "pending":
            return False
        self._finish("cancelled")
        return True

    def _finish(self, state: str) -> None:
        self._state = state
        for callback, context in self._callbacks:
            self._loop.call_soon(callback, self, context=context)
        self._callbacks.clear()


async def test_a_future_of_another_implementation_is_waited_for_as_a_task_would() -> None:
    future = ForeignFuture()
    steps: list[object] = []

    async def waits() -> None:
        steps.append(await future)
        steps.append(await asyncio.sleep(0, "bare yield"))  # and a bare yield after it

    task = start_eagerly(waits())
    assert task is not None
    # Still pending when the task first steps (the send of a client that is slow to read): the
    # task must be handed the future as the coroutine yielded it, and wait for it.
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert steps == [] and not task.done()
    future.set_result("sent")
    await asyncio.wait_for(task, 1)
    assert steps == ["sent", "bare yield"]


async def test_cancelling_the_task_cancels_a_future_of_another_implementation() -> None:
    future = ForeignFuture()
    cleaned: list[str] = []

    async def waits() -> None:
        try:
            await future
        except asyncio.CancelledError:
            cleaned.append("cancelled")
            raise

    task = start_eagerly(waits())
    assert task is not None
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 1)
    assert future.cancelled()  # the send is withdrawn, as a task running the coroutine would do
    assert cleaned == ["cancelled"]


async def test_a_failure_of_what_it_waits_for_is_raised_where_it_waits() -> None:
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    caught: list[BaseException] = []

    async def waits() -> None:
        try:
            await future
        except ValueError as exc:
            caught.append(exc)

    task = start_eagerly(waits())
    assert task is not None
    future.set_exception(ValueError("boom"))
    await task
    assert [str(exc) for exc in caught] == ["boom"]


@pytest.mark.parametrize("started", [True, False], ids=["after-its-first-step", "before-it-ran"])
async def test_cancelling_the_task_cancels_the_coroutine_where_it_waits(started: bool) -> None:
    cleaned: list[str] = []

    async def waits_forever() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cleaned.append("cancelled")
            raise
        finally:
            cleaned.append("finally")

    task = start_eagerly(waits_forever())
    assert task is not None
    if started:
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # Once the task runs, the cancellation is raised where the coroutine waits; before that,
    # the coroutine is closed, and its cleanup runs all the same.
    assert cleaned == (["cancelled", "finally"] if started else ["finally"])


async def test_an_error_before_the_first_wait_is_raised_to_the_caller() -> None:
    async def fails() -> None:
        raise KeyError("early")

    with pytest.raises(KeyError):
        start_eagerly(fails())


async def test_context_changes_stay_in_the_coroutine_as_in_a_task() -> None:
    seen: list[str] = []
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def sets() -> None:
        where.set("coroutine")
        await future
        seen.append(where.get())

    task = start_eagerly(sets())
    assert where.get() == "caller"
    assert task is not None
    future.set_result(None)
    await task
    assert seen == ["coroutine"]
