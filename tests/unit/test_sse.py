"""The Server-Sent Events transport, driven straight through the app's ASGI interface."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import jwt
import pytest

from starlette_dream_ws import DreamWebSocketApp, asend_image_update
from tests.support.authorizers import owner_only
from tests.support.tokens import UNIT_SECRET

pytestmark = pytest.mark.anyio

MakeApp = Callable[..., DreamWebSocketApp]
TIMEOUT = 5.0


def token(user: str = "u1", expires_in: float = 3600) -> str:
    return jwt.encode({"sub": user, "exp": int(time.time() + expires_in)}, UNIT_SECRET, algorithm="HS256")


class Stream:
    """One GET of an event stream: what the app sends, parsed into status, headers and events."""

    def __init__(
        self, app: DreamWebSocketApp, path: str, *, headers: dict[str, str] | None = None, method: str = "GET"
    ) -> None:
        route, _, query = path.partition("?")
        raw_headers = [(b"host", b"testserver")]
        raw_headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
        scope = {
            "type": "http",
            "method": method,
            "path": route,
            "raw_path": route.encode(),
            "root_path": "",
            "query_string": query.encode(),
            "headers": raw_headers,
            "client": ("127.0.0.1", 1),
            "server": ("testserver", 80),
            "scheme": "http",
            "http_version": "1.1",
            "asgi": {"version": "3.0"},
        }
        self.incoming: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.incoming.put_nowait({"type": "http.request", "body": b"", "more_body": False})
        self.messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.status: int | None = None
        self.headers: dict[str, str] = {}
        self.ended = False
        self._buffer = ""
        self.task = asyncio.ensure_future(app(scope, self.incoming.get, self._sent))

    async def _sent(self, message: dict[str, Any]) -> None:
        self.messages.put_nowait(message)

    async def start(self) -> int:
        message = await asyncio.wait_for(self.messages.get(), TIMEOUT)
        assert message["type"] == "http.response.start"
        self.status = message["status"]
        self.headers = {k.decode(): v.decode() for k, v in message["headers"]}
        return message["status"]

    async def body(self) -> bytes:
        message = await asyncio.wait_for(self.messages.get(), TIMEOUT)
        assert message["type"] == "http.response.body"
        self.ended = not message.get("more_body", False)
        return bytes(message["body"])

    async def next_block(self) -> str:
        """The next block of lines up to a blank line (an event, a comment, a `retry:`)."""
        while "\n\n" not in self._buffer:
            if self.ended:
                raise EOFError("the stream ended")
            self._buffer += (await self.body()).decode()
        block, self._buffer = self._buffer.split("\n\n", 1)
        return block

    async def event(self) -> dict[str, Any]:
        """The next event: its `event`, `id` and decoded `data` (comments and `retry:` skipped)."""
        while True:
            fields: dict[str, Any] = {}
            for line in (await self.next_block()).split("\n"):
                if line.startswith(":") or line.startswith("retry:"):
                    continue
                name, _, value = line.partition(": ")
                fields[name] = value
            if "data" in fields:
                fields["data"] = json.loads(fields["data"])
                return fields

    async def disconnect(self) -> None:
        self.incoming.put_nowait({"type": "http.disconnect"})
        await asyncio.wait_for(self.task, TIMEOUT)


async def refused(app: DreamWebSocketApp, path: str, **options: Any) -> tuple[int, dict[str, Any]]:
    stream = Stream(app, path, **options)
    status = await stream.start()
    body = await stream.body()
    assert stream.ended and stream.headers["content-type"] == "application/json"
    await asyncio.wait_for(stream.task, TIMEOUT)
    return status, json.loads(body)


async def test_updates_stream_as_events_with_positions_as_ids(make_app: MakeApp) -> None:
    app = make_app()
    stream = Stream(app, "/dreams/1/events", headers={"Authorization": f"Bearer {token()}"})
    try:
        assert await stream.start() == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        assert (await stream.next_block()).startswith("retry: ")
        first = await stream.event()
        assert first["event"] == "connection_established" and first["data"]["seq"] == 0
        await asend_image_update(1, ["a.png"], "completed", "done")
        update = await stream.event()
        epoch = first["data"]["epoch"]
        assert (update["event"], update["id"]) == ("image_update", f"{epoch}:1")
        assert update["data"]["status"] == "completed" and update["data"]["seq"] == 1
    finally:
        await stream.disconnect()
        await app.close()


async def test_last_event_id_resumes_with_every_missed_update(make_app: MakeApp) -> None:
    app = make_app()
    await app.start()
    try:
        positions = [await app.layer.publish("dream_images_2", {"type": "image_update", "n": n}) for n in range(1, 5)]
        since = str(positions[1])
        stream = Stream(app, f"/dreams/2/events?token={token()}&since=other:1", headers={"Last-Event-ID": since})
        try:
            assert await stream.start() == 200
            first = await stream.event()
            assert first["data"]["recovered"] is True and first["data"]["seq"] == 4
            missed = [await stream.event() for _ in range(2)]
            assert [(e["id"], e["data"]["n"]) for e in missed] == [(str(positions[2]), 3), (str(positions[3]), 4)]
        finally:
            await stream.disconnect()
    finally:
        await app.close()


@pytest.mark.parametrize(
    ("path", "headers", "status", "code"),
    [
        ("/dreams/1/events", {}, 401, "unauthenticated"),
        ("/dreams/1/events?token=not-a-jwt", {}, 401, "unauthenticated"),
        ("/dreams/2/events?token={u1}", {}, 403, "forbidden"),
        ("/dreams/1/events?token={u1}", {"Origin": "https://elsewhere.example"}, 403, "origin_not_allowed"),
        ("/dreams/1/events?token={u1}&since=nonsense", {}, 400, "invalid_since"),
        ("/dreams/1/events?token={u1}", {"Last-Event-ID": "x:y"}, 400, "invalid_since"),
    ],
)
async def test_refusals_are_plain_http_with_a_json_error(
    make_app: MakeApp, path: str, headers: dict[str, str], status: int, code: str
) -> None:
    app = make_app(authorize=owner_only)
    try:
        got_status, body = await refused(app, path.format(u1=token("u1")), headers=headers)
    finally:
        await app.close()
    assert (got_status, body["type"], body["code"]) == (status, "error", code)
    assert token("u1") not in json.dumps(body)


async def test_past_the_per_user_limit_is_429(make_app: MakeApp) -> None:
    app = make_app(max_connections_per_user=1)
    first = Stream(app, f"/dreams/1/events?token={token()}")
    try:
        assert await first.start() == 200
        status, body = await refused(app, f"/dreams/1/events?token={token()}")
        assert (status, body["code"]) == (429, "too_many_connections")
    finally:
        await first.disconnect()
        await app.close()


async def test_only_get_is_allowed(make_app: MakeApp) -> None:
    app = make_app()
    status, body = await refused(app, f"/dreams/1/events?token={token()}", method="POST")
    assert (status, body["code"]) == (405, "method_not_allowed")


async def test_pings_are_comments_and_silence_does_not_close_the_stream(make_app: MakeApp) -> None:
    app = make_app(heartbeat_interval=0.05, heartbeat_timeout=0.1)
    stream = Stream(app, f"/dreams/1/events?token={token()}")
    try:
        assert await stream.start() == 200
        await stream.event()
        blocks = [await stream.next_block() for _ in range(5)]  # well past the heartbeat timeout
        assert blocks == [": ping"] * 5
        assert not stream.ended
    finally:
        await stream.disconnect()
        await app.close()


async def test_shutdown_and_token_expiry_end_the_stream(make_app: MakeApp) -> None:
    app = make_app(heartbeat_interval=0.05)
    stream = Stream(app, f"/dreams/1/events?token={token()}")
    expiring = Stream(app, f"/dreams/3/events?token={token(expires_in=1)}")
    try:
        assert await stream.start() == 200 and await expiring.start() == 200
        await stream.event()
        event = await expiring.event()
        while event["event"] != "error":
            event = await expiring.event()
        assert event["data"]["code"] == "token_expired"
        with pytest.raises(EOFError):
            await expiring.event()
        await app.close()
        with pytest.raises(EOFError):
            while True:
                await stream.event()
    finally:
        await stream.disconnect()
        await expiring.disconnect()
