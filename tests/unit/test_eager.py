"""start_eagerly: run now, and only what has to wait gets a task, with task semantics kept."""

from __future__ import annotations

import asyncio
import contextvars

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
