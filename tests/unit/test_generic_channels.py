"""Channels for any job kind: path converters, the generic publisher, the app's authorizer and
authenticator, publishing on memory:// before the first connection."""

from __future__ import annotations

import threading
import uuid
import weakref
from collections.abc import AsyncIterator
from typing import Any

import pytest
from starlette.requests import HTTPConnection

from starlette_dream_ws import (
    ConsumerApp,
    DreamWebSocketApp,
    JobConsumer,
    User,
    aclose_producers,
    allow_any_authenticated_user,
    apublish,
    asend_image_update,
    job_group,
    publish,
)
from starlette_dream_ws.groups import shared
from starlette_dream_ws.testing import ConsumerTestClient
from tests.support.tokens import UNIT_SECRET

pytestmark = pytest.mark.anyio

#: A URL of these tests' own: the memory hub is process-wide per URL.
MEMORY = "memory://generic-channels"


class RenderConsumer(JobConsumer):
    group_kind = "renders"

    async def render_update(self, event: dict[str, Any]) -> None:
        await self.send_json(event)


@pytest.fixture(autouse=True)
async def _close_producers() -> AsyncIterator[None]:
    yield
    await aclose_producers()


def render_app(path: str, **overrides: Any) -> ConsumerApp:
    overrides.setdefault("authorize", allow_any_authenticated_user)
    return ConsumerApp({path: RenderConsumer}, jwt_secret=UNIT_SECRET, broadcast_url=MEMORY, **overrides)


@pytest.mark.parametrize(
    ("path", "job_id", "greeted"),
    [
        ("/renders/{render_id:int}", "42", 42),
        ("/renders/{render_id:str}", "clip-7.v2", "clip-7.v2"),
        ("/renders/{render_id}", "abc", "abc"),
        ("/renders/{render_id:uuid}", "6f1c9a52-5d0e-4f3a-9b7e-0c2d9e8f1a11", "6f1c9a52-5d0e-4f3a-9b7e-0c2d9e8f1a11"),
    ],
)
async def test_any_path_converter_works_end_to_end(path: str, job_id: str, greeted: object) -> None:
    async with ConsumerTestClient(render_app(path)) as client, client.connect(f"/renders/{job_id}") as ws:
        greeting = await ws.receive_json()
        assert greeting["type"] == "connection_established" and greeting["render_id"] == greeted
        await apublish(job_group("renders", greeted), {"type": "render_update", "percent": 10})
        update = await ws.receive_until("render_update")
        assert update["percent"] == 10 and update["seq"] == 1
        await ws.send_json({"type": "request_status", "render_id": greeted})
        assert (await ws.receive_until("render_update"))["percent"] == 10


async def test_ids_that_cannot_name_a_group_are_refused_with_1008() -> None:
    async with ConsumerTestClient(render_app("/renders/{render_id:str}")) as client:
        async with client.connect("/renders/" + "x" * 49) as ws:
            code, messages = await ws.expect_close()
        assert code == 1008 and messages[0]["code"] == "invalid_id"
        async with client.connect("/renders/a%7Bb%7D") as ws:  # braces
            code, messages = await ws.expect_close()
        assert code == 1008 and messages[0]["code"] == "invalid_id"


async def test_the_apps_authorizer_decides_for_the_base_consumer() -> None:
    asked: list[tuple[str, object]] = []

    def only_mine(user: User, render_id: uuid.UUID) -> bool:
        asked.append((user.id, render_id))
        return render_id.int % 2 == 0

    mine, other = uuid.UUID(int=2), uuid.UUID(int=3)
    app = render_app("/renders/{render_id:uuid}", authorize=only_mine)
    async with ConsumerTestClient(app) as client:
        async with client.connect(f"/renders/{mine}", user="ada") as ws:
            assert (await ws.receive_json())["type"] == "connection_established"
        async with client.connect(f"/renders/{other}", user="ada") as ws:
            assert (await ws.expect_close())[0] == 4403
    # The converter's value itself (a UUID), as the path parameter gives it.
    assert asked == [("ada", mine), ("ada", other)]


async def test_without_an_authorizer_the_base_consumer_refuses() -> None:
    app = ConsumerApp({"/renders/{render_id}": RenderConsumer}, jwt_secret=UNIT_SECRET, broadcast_url=MEMORY)
    async with ConsumerTestClient(app) as client, client.connect("/renders/1") as ws:
        assert (await ws.expect_close())[0] == 4403


async def test_the_apps_authenticator_replaces_tokens() -> None:
    def from_header(connection: HTTPConnection) -> User | None:
        name = connection.headers.get("x-user")
        return User(id=name, claims={}) if name else None

    # No JWT secret at all: nothing asks for one.
    app = ConsumerApp(
        {"/renders/{render_id}": RenderConsumer},
        authorize=allow_any_authenticated_user,
        authenticate=from_header,
        broadcast_url=MEMORY,
    )
    async with ConsumerTestClient(app) as client:
        async with client.connect("/renders/1", user=None, headers={"x-user": "ada"}) as ws:
            assert (await ws.receive_json())["type"] == "connection_established"
            await ws.send_json({"type": "refresh_token", "token": "t"})
            assert (await ws.receive_json())["code"] == "unsupported"
        async with client.connect("/renders/1", user=None) as ws:
            code, messages = await ws.expect_close()
        assert code == 4401 and messages[0]["code"] == "unauthenticated"


async def test_an_authenticator_returning_garbage_is_an_internal_error_not_a_grant() -> None:
    app = ConsumerApp(
        {"/renders/{render_id}": RenderConsumer},
        authorize=allow_any_authenticated_user,
        authenticate=lambda connection: "ada",  # type: ignore[arg-type,return-value]
        broadcast_url=MEMORY,
    )
    async with ConsumerTestClient(app) as client, client.connect("/renders/1", user=None) as ws:
        assert (await ws.expect_close())[0] == 1011


async def test_publishing_on_memory_works_before_the_first_connection_without_a_lifespan(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A mounted app (no lifespan helper) that has had no connection yet: an endpoint publishes.
    # It is the process's only app (other tests' apps may not have been collected yet).
    monkeypatch.setattr(shared, "_declared", weakref.WeakSet())
    app = DreamWebSocketApp(authorize=allow_any_authenticated_user, jwt_secret=UNIT_SECRET, broadcast_url=MEMORY)
    assert not app.layer.connected
    await asend_image_update(77, status="processing", progress=30)
    async with ConsumerTestClient(app) as client, client.connect("/dreams/77") as ws:
        greeting = await ws.receive_json()
        assert greeting["seq"] == 1  # the update is the dream's history
        await ws.send_json({"type": "request_status"})
        latest = await ws.receive_until("image_update")
        assert latest["progress"] == 30 and latest["seq"] == 1


async def test_sync_publish_from_a_thread_of_the_serving_process() -> None:
    app = render_app("/renders/{render_id}")
    async with ConsumerTestClient(app) as client, client.connect("/renders/9") as ws:
        await ws.receive_json()
        failures: list[BaseException] = []

        def worker() -> None:
            try:
                publish(job_group("renders", 9), {"type": "render_update", "percent": 99})
            except BaseException as exc:  # reported to the test, which fails on it
                failures.append(exc)

        thread = threading.Thread(target=worker)
        thread.start()
        assert (await ws.receive_until("render_update"))["percent"] == 99
        thread.join()
        assert failures == []


@pytest.mark.parametrize(
    ("group", "event", "error"),
    [
        ("renders_1", {"type": "Render"}, ValueError),
        ("renders_1", {"type": "x" * 65}, ValueError),
        ("renders_1", {"kind": "no type"}, ValueError),
        ("renders_1", {"type": "ok", "value": float("nan")}, ValueError),
        ("renders_1", {"type": "ok", "value": object()}, ValueError),
        ("renders_1", ["type", "ok"], TypeError),
        ("renders {1}", {"type": "ok"}, ValueError),
        ("r" * 64, {"type": "ok"}, ValueError),
        ("", {"type": "ok"}, ValueError),
    ],
)
async def test_bad_groups_and_events_are_refused_before_anything_is_sent(
    group: str, event: Any, error: type[Exception]
) -> None:
    with pytest.raises(error):
        await apublish(group, event, settings=None)
    with pytest.raises(error):
        publish(group, event)


async def test_memory_publishing_in_a_process_without_an_app_names_the_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(shared, "_declared", weakref.WeakSet())
    monkeypatch.setenv("DREAM_WS_BROADCAST_URL", "memory://nobody-serves-this")
    with pytest.raises(RuntimeError, match="DREAM_WS_BROADCAST_URL"):
        await apublish("renders_1", {"type": "render_update"})
