"""Producer input validation: a bad update raises before anything is published."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest

from starlette_dream_ws import (
    DreamWebSocketApp,
    ImageStatus,
    allow_any_authenticated_user,
    asend_image_update,
    image_update_message,
    send_image_update,
)
from starlette_dream_ws import protocol as protocol_module

SECRET = "producer-test-secret-with-32-bytes-or-more"
GROUP = "dream_images_5"
STATUSES = ["processing", "completed", "failed", "delete_processing", "delete_completed", "delete_failed"]
TIMEOUT = 2.0

pytestmark = pytest.mark.anyio


class Recorder:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self._arrived = asyncio.Event()

    def deliver(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        self._arrived.set()

    async def first(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        async def wait() -> None:
            while not self.events:
                self._arrived.clear()
                await self._arrived.wait()

        await asyncio.wait_for(wait(), timeout)
        return self.events[0]


@contextlib.asynccontextmanager
async def running_app() -> AsyncIterator[tuple[DreamWebSocketApp, Recorder]]:
    """An app with its layer connected and a member watching dream 5."""
    app = DreamWebSocketApp(authorize=allow_any_authenticated_user, jwt_secret=SECRET, broadcast_url="memory://")
    await app.start()
    member = Recorder()
    try:
        await app.layer.join(GROUP, member)
        yield app, member
    finally:
        await app.close()


def test_there_are_six_statuses() -> None:
    assert sorted(status.value for status in ImageStatus) == sorted(STATUSES)


@pytest.mark.parametrize("status", STATUSES)
async def test_each_status_is_published_and_remembered(status: str) -> None:
    async with running_app() as (app, member):
        await asend_image_update(5, ["a.png", "b.png"], status, "hello", settings=app.settings)
        event = await member.first()
        assert event["type"] == "image_update"
        assert event["dream_id"] == 5
        assert event["status"] == status
        assert event["images"] == ["a.png", "b.png"]
        assert event["message"] == "hello"
        assert await app.layer.latest(GROUP) == event


async def test_a_status_enum_member_is_sent_as_its_value() -> None:
    async with running_app() as (app, member):
        await asend_image_update(5, None, ImageStatus.DELETE_COMPLETED, settings=app.settings)
        event = await member.first()
        assert event["status"] == "delete_completed"
        assert type(event["status"]) is str
        assert event["images"] == []


async def test_a_bad_status_raises_before_anything_is_published() -> None:
    async with running_app() as (app, member):
        with pytest.raises(ValueError, match="status"):
            await asend_image_update(5, ["a.png"], "done", settings=app.settings)
        with pytest.raises(ValueError, match="status"):
            await asend_image_update(5, ["a.png"], "COMPLETED", settings=app.settings)
        # The sync function validates before it refuses to run in the loop's thread...
        with pytest.raises(ValueError, match="status"):
            send_image_update(5, ["a.png"], "done", settings=app.settings)
        # ...and in a worker thread, where it would otherwise publish.
        with pytest.raises(ValueError, match="status"):
            await asyncio.to_thread(send_image_update, 5, ["a.png"], "done", settings=app.settings)
        assert await app.layer.latest(GROUP) is None

        await asend_image_update(5, ["good.png"], "completed", settings=app.settings)
        first = await member.first()
        assert first["status"] == "completed"
        assert first["images"] == ["good.png"]


async def test_send_image_update_from_a_thread_reaches_the_app() -> None:
    async with running_app() as (app, member):
        await asyncio.to_thread(send_image_update, 5, ["t.png"], "failed", "boom", settings=app.settings)
        event = await member.first()
        assert (event["status"], event["images"], event["message"]) == ("failed", ["t.png"], "boom")


async def test_send_image_update_in_the_loop_thread_points_to_the_async_function() -> None:
    async with running_app() as (app, member):
        with pytest.raises(RuntimeError, match="asend_image_update"):
            send_image_update(5, ["a.png"], "completed", settings=app.settings)
        await asend_image_update(5, ["after.png"], "completed", settings=app.settings)
        assert (await member.first())["images"] == ["after.png"]


@pytest.mark.parametrize(
    ("dream_id", "error"),
    [(0, ValueError), (-1, ValueError), (True, TypeError), ("5", TypeError), (5.0, TypeError), (None, TypeError)],
)
async def test_a_bad_dream_id_raises(dream_id: Any, error: type[Exception]) -> None:
    with pytest.raises(error):
        image_update_message(dream_id, ["a.png"], "completed")
    async with running_app() as (app, member):
        with pytest.raises(error):
            await asend_image_update(dream_id, ["a.png"], "completed", settings=app.settings)
        with pytest.raises(error):
            await asyncio.to_thread(send_image_update, dream_id, ["a.png"], "completed", settings=app.settings)
        await asend_image_update(5, ["good.png"], "completed", settings=app.settings)
        assert (await member.first())["images"] == ["good.png"]


@pytest.mark.parametrize("image_urls", ["a.png", b"a.png", [1], ["a.png", None], [b"a.png"]])
async def test_bad_image_urls_raise(image_urls: Any) -> None:
    with pytest.raises(TypeError):
        image_update_message(5, image_urls, "completed")
    async with running_app() as (app, member):
        with pytest.raises(TypeError):
            await asend_image_update(5, image_urls, "completed", settings=app.settings)
        with pytest.raises(TypeError):
            await asyncio.to_thread(send_image_update, 5, image_urls, "completed", settings=app.settings)
        await asend_image_update(5, ["good.png"], "completed", settings=app.settings)
        assert (await member.first())["images"] == ["good.png"]


def test_image_urls_are_copied_into_a_list() -> None:
    urls = ("a.png", "b.png")
    assert image_update_message(5, urls)["images"] == ["a.png", "b.png"]
    assert image_update_message(5)["images"] == []
    mutable = ["a.png"]
    message = image_update_message(5, mutable)
    mutable.append("later.png")
    assert message["images"] == ["a.png"]


def test_an_iterator_of_urls_is_not_silently_emptied() -> None:
    try:
        message = image_update_message(5, iter(["a.png", "b.png"]))  # type: ignore[arg-type]
    except TypeError:
        return  # refusing it would be fine too
    assert message["images"] == ["a.png", "b.png"]


def test_timestamp_is_a_float_taken_at_call_time(monkeypatch: pytest.MonkeyPatch) -> None:
    before = time.time()
    message = image_update_message(5, None, "processing")
    after = time.time()
    assert isinstance(message["timestamp"], float)
    assert before <= message["timestamp"] <= after
    # Taken on each call, from the clock at that moment.
    monkeypatch.setattr(protocol_module, "time", SimpleNamespace(time=lambda: 1234.5))
    assert image_update_message(5)["timestamp"] == 1234.5
    monkeypatch.setattr(protocol_module, "time", SimpleNamespace(time=lambda: 2345.5))
    assert image_update_message(5)["timestamp"] == 2345.5


async def test_published_timestamp_is_set_by_the_producer() -> None:
    async with running_app() as (app, member):
        before = time.time()
        await asend_image_update(5, None, "completed", settings=app.settings)
        after = time.time()
        event = await member.first()
        assert isinstance(event["timestamp"], float)
        assert before <= event["timestamp"] <= after


def test_message_is_none_or_a_string() -> None:
    assert image_update_message(5)["message"] is None
    assert image_update_message(5, message=None)["message"] is None
    assert image_update_message(5, message="")["message"] == ""
    assert image_update_message(5, message="rendering 2 of 4")["message"] == "rendering 2 of 4"
    for bad in (5, b"bytes", ["list"], {"a": 1}):
        with pytest.raises(TypeError):
            image_update_message(5, message=bad)  # type: ignore[arg-type]


async def test_a_bad_message_raises_before_anything_is_published() -> None:
    async with running_app() as (app, member):
        with pytest.raises(TypeError):
            await asend_image_update(5, None, "completed", 42, settings=app.settings)  # type: ignore[arg-type]
        await asend_image_update(5, None, "completed", "ok", settings=app.settings)
        assert (await member.first())["message"] == "ok"


def test_message_shape() -> None:
    message = image_update_message(7, ["x.png"], "completed", "done")
    assert set(message) == {"type", "dream_id", "status", "images", "timestamp", "message"}
    assert message["type"] == "image_update"
