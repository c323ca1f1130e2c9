"""Positions on the wire: every update carries `seq` and `epoch`, a connection never goes back,
and a client that resumes with `since` gets exactly what it missed (memory backend)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from starlette_dream_ws import DreamWebSocketApp, asend_image_update
from starlette_dream_ws.testing import ClientConnection, ConsumerTestClient

pytestmark = pytest.mark.anyio

MakeApp = Callable[..., DreamWebSocketApp]


async def greeting(ws: ClientConnection) -> dict[str, Any]:
    first = await ws.receive_json()
    assert first["type"] == "connection_established"
    return first


async def updates(ws: ClientConnection, count: int) -> list[dict[str, Any]]:
    return [await ws.receive_until("image_update") for _ in range(count)]


async def test_updates_carry_consecutive_positions_and_the_greeting_the_current_one(make_app: MakeApp) -> None:
    async with ConsumerTestClient(make_app()) as client:
        async with client.connect("/dreams/7") as ws:
            first = await greeting(ws)
            assert first["seq"] == 0 and isinstance(first["epoch"], str)
            for n in range(3):
                await asend_image_update(7, message=str(n))
            got = await updates(ws, 3)
        assert [(u["seq"], u["epoch"], u["message"]) for u in got] == [
            (n + 1, first["epoch"], str(n)) for n in range(3)
        ]
        async with client.connect("/dreams/7") as ws:
            again = await greeting(ws)
            assert (again["epoch"], again["seq"]) == (first["epoch"], 3)
            await ws.send_json({"type": "request_status"})
            assert (await ws.receive_json())["seq"] == 3


async def test_a_status_answer_is_never_older_than_an_update_already_sent(make_app: MakeApp) -> None:
    """The race of `request_status` answers against live updates, many times over."""
    async with ConsumerTestClient(make_app(max_messages_per_second=1000, message_burst=1000)) as client:
        async with contextlib.AsyncExitStack() as stack:
            sockets = [await stack.enter_async_context(client.connect("/dreams/9")) for _ in range(6)]
            for ws in sockets:
                await greeting(ws)

            async def publish_all() -> None:
                for n in range(200):
                    await asend_image_update(9, message=str(n))
                    await asyncio.sleep(0)

            publishing = asyncio.ensure_future(publish_all())
            while not publishing.done():
                for ws in sockets:
                    await ws.send_json({"type": "request_status"})
                await asyncio.sleep(0)
            await publishing
            for ws in sockets:
                seqs: list[int] = []
                while not seqs or seqs[-1] < 200:
                    message = await ws.receive_json()
                    if message["type"] == "image_update":
                        seqs.append(message["seq"])
                # Never older. An answer may repeat the newest; a live update older than an
                # answer already sent is not sent at all.
                assert seqs == sorted(seqs), f"an update arrived after a newer one: {seqs}"


async def test_resuming_within_the_history_gets_every_missed_update_once_then_live_ones(make_app: MakeApp) -> None:
    async with ConsumerTestClient(make_app()) as client:
        async with client.connect("/dreams/5") as ws:
            epoch = (await greeting(ws))["epoch"]
            for n in range(1, 6):
                await asend_image_update(5, message=str(n))
            assert [u["seq"] for u in await updates(ws, 5)] == [1, 2, 3, 4, 5]
        for n in range(6, 11):  # published while the client is away
            await asend_image_update(5, message=str(n))
        async with client.connect(f"/dreams/5?since={epoch}:5") as ws:
            first = await greeting(ws)
            assert (first["recovered"], first["epoch"], first["seq"]) == (True, epoch, 10)
            missed = await updates(ws, 5)
            await asend_image_update(5, message="11")
            live = await updates(ws, 1)
        assert [(u["seq"], u["message"]) for u in missed + live] == [(n, str(n)) for n in range(6, 12)]


async def test_resuming_at_the_current_position_recovers_nothing_to_send(make_app: MakeApp) -> None:
    async with ConsumerTestClient(make_app()) as client:
        await asend_image_update(4)
        async with client.connect("/dreams/4") as ws:
            epoch = (await greeting(ws))["epoch"]
        async with client.connect(f"/dreams/4?since={epoch}:1") as ws:
            assert (await greeting(ws))["recovered"] is True
            await asend_image_update(4, message="next")
            assert [(u["seq"], u["message"]) for u in await updates(ws, 1)] == [(2, "next")]


@pytest.mark.parametrize("since", ["other:1", "{epoch}:0", "{epoch}:99"])
async def test_a_position_that_cannot_be_resumed_gets_recovered_false_and_the_latest_state(
    make_app: MakeApp, since: str
) -> None:
    # history_size 3: seq 0 is too far behind; another epoch or a future seq is not this history.
    async with ConsumerTestClient(make_app(history_size=3)) as client:
        for n in range(1, 6):
            await asend_image_update(3, message=str(n))
        async with client.connect("/dreams/3") as ws:
            epoch = (await greeting(ws))["epoch"]
        async with client.connect("/dreams/3?since=" + since.format(epoch=epoch)) as ws:
            first = await greeting(ws)
            assert first["recovered"] is False and first["seq"] == 5
            latest = await ws.receive_json()
            assert (latest["type"], latest["seq"], latest["message"]) == ("image_update", 5, "5")


async def test_not_recovered_and_nothing_published_sends_no_update(make_app: MakeApp) -> None:
    async with ConsumerTestClient(make_app()) as client:
        async with client.connect("/dreams/8?since=gone:4") as ws:
            first = await greeting(ws)
            assert first["recovered"] is False and first["seq"] == 0
            await ws.send_json({"type": "ping", "timestamp": 1})
            assert await ws.receive_json() == {"type": "pong", "timestamp": 1}


@pytest.mark.parametrize("since", ["", "abc", "abc:", ":5", "abc:-1", "abc:1.5", "a b:1", "x" * 33 + ":1", "e:1e3"])
async def test_a_malformed_since_is_invalid_since_and_1008(make_app: MakeApp, since: str) -> None:
    async with ConsumerTestClient(make_app()) as client, client.connect(f"/dreams/2?since={since}") as ws:
        code, messages = await ws.expect_close()
    assert code == 1008
    assert [m.get("code") for m in messages] == ["invalid_since"]


# -- random interleavings ---------------------------------------------------------------------------

Step = tuple[str, int]
steps = st.lists(
    st.one_of(
        st.tuples(st.just("publish"), st.integers(1, 3)),
        st.tuples(st.sampled_from(["connect", "request_status", "drop", "resume"]), st.integers(0, 2)),
    ),
    min_size=1,
    max_size=25,
)


class FakeSocket:
    """A WebSocket client driven straight through the app's ASGI interface: any number open
    and closed in any order (the in-process client's contexts must nest)."""

    def __init__(self, app: DreamWebSocketApp, path: str, token: str) -> None:
        route, _, query = path.partition("?")
        query += ("&" if query else "") + "token=" + token
        scope = {
            "type": "websocket",
            "path": route,
            "raw_path": route.encode(),
            "root_path": "",
            "query_string": query.encode(),
            "headers": [(b"host", b"testserver")],
            "subprotocols": [],
            "client": ("127.0.0.1", 1),
            "server": ("testserver", 80),
            "scheme": "ws",
            "asgi": {"version": "3.0"},
        }
        self.incoming: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.outgoing: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.incoming.put_nowait({"type": "websocket.connect"})
        self.task = asyncio.ensure_future(app(scope, self.incoming.get, self._sent))

    async def _sent(self, message: dict[str, Any]) -> None:
        self.outgoing.put_nowait(message)

    async def receive_json(self) -> dict[str, Any]:
        while True:
            message = await asyncio.wait_for(self.outgoing.get(), 5)
            if message["type"] == "websocket.send":
                return dict(json.loads(message["text"]))
            assert message["type"] == "websocket.accept", message

    async def send_json(self, content: dict[str, Any]) -> None:
        self.incoming.put_nowait({"type": "websocket.receive", "text": json.dumps(content)})

    async def close(self) -> None:
        self.incoming.put_nowait({"type": "websocket.disconnect", "code": 1000})
        await asyncio.wait_for(self.task, 5)


class Watcher:
    """A client as the browser client behaves: applies an update only if it is newer."""

    def __init__(self, app: DreamWebSocketApp, token: str) -> None:
        self.app = app
        self.token = token
        self.ws: FakeSocket | None = None
        self.epoch: str | None = None
        self.applied: list[int] = []

    async def open(self, resume: bool) -> None:
        path = "/dreams/1"
        if resume and self.epoch is not None and self.applied:
            path += f"?since={self.epoch}:{self.applied[-1]}"
        self.ws = FakeSocket(self.app, path, self.token)
        first = await self.ws.receive_json()
        assert first["type"] == "connection_established"
        if self.epoch != first["epoch"]:
            self.epoch, self.applied = first["epoch"], []

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        self.ws = None

    def apply(self, message: dict[str, Any]) -> None:
        if message["type"] != "image_update":
            return
        assert message["epoch"] == self.epoch
        if self.applied and message["seq"] <= self.applied[-1]:
            # Only a status answer may repeat what was applied, never go back.
            assert message["seq"] == self.applied[-1]
            return
        self.applied.append(message["seq"])

    async def settle(self, final: int) -> None:
        """Read until the final state is applied (asking for it, as after any connect)."""
        assert self.ws is not None
        await self.ws.send_json({"type": "request_status"})
        while not self.applied or self.applied[-1] < final:
            message = await self.ws.receive_json()
            if message["type"] == "error":
                assert final == 0 and message["code"] == "status_unknown"
                return
            self.apply(message)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(script=steps)
async def test_any_interleaving_applies_increasing_positions_and_ends_at_the_final_state(
    make_app: MakeApp, script: list[Step]
) -> None:
    app = make_app(max_messages_per_second=1000, message_burst=1000)
    async with ConsumerTestClient(app) as client:
        watchers = [Watcher(app, client.token(f"user{n}")) for n in range(3)]
        published = 0
        try:
            for action, arg in script:
                if action == "publish":
                    for _ in range(arg):
                        published += 1
                        await asend_image_update(1, message=str(published))
                    continue
                watcher = watchers[arg]
                if action in ("connect", "resume"):
                    await watcher.close()
                    await watcher.open(resume=action == "resume")
                elif action == "drop":
                    await watcher.close()
                elif watcher.ws is not None:
                    await watcher.ws.send_json({"type": "request_status"})
            for watcher in watchers:
                if watcher.ws is None:
                    await watcher.open(resume=True)
                await watcher.settle(published)
                assert watcher.applied == sorted(set(watcher.applied))
                assert (watcher.applied[-1] if watcher.applied else 0) == published
        finally:
            for watcher in watchers:
                await watcher.close()
