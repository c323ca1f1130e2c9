"""Every message of the protocol and the answers to bad input, on the memory backend."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from starlette_dream_ws import DreamWebSocketApp, asend_image_update
from starlette_dream_ws.testing import ClientConnection, ConsumerTestClient

pytestmark = pytest.mark.anyio

MakeApp = Callable[..., DreamWebSocketApp]


async def _greeted(ws: ClientConnection) -> None:
    assert (await ws.receive_json())["type"] == "connection_established"


async def _still_open(ws: ClientConnection) -> None:
    await ws.send_json({"type": "ping", "timestamp": "check"})
    assert await ws.receive_json() == {"type": "pong", "timestamp": "check"}


async def test_image_update_has_every_field(make_app: MakeApp) -> None:
    async with ConsumerTestClient(make_app()) as client, client.connect("/dreams/3") as ws:
        await _greeted(ws)
        await asend_image_update(3, ["https://cdn/a.png", "https://cdn/b.png"], "completed", "done")
        update = await ws.receive_json()
    timestamp = update.pop("timestamp")
    assert isinstance(timestamp, float)
    epoch = update.pop("epoch")
    assert isinstance(epoch, str) and 1 <= len(epoch) <= 32
    assert update == {
        "type": "image_update",
        "dream_id": 3,
        "status": "completed",
        "images": ["https://cdn/a.png", "https://cdn/b.png"],
        "message": "done",
        "seq": 1,
    }


async def test_updates_reach_only_their_dream_in_order(make_app: MakeApp) -> None:
    async with ConsumerTestClient(make_app()) as client:
        async with client.connect("/dreams/1") as one, client.connect("/dreams/2") as two:
            await _greeted(one)
            await _greeted(two)
            await asend_image_update(1, status="processing")
            await asend_image_update(1, ["x.png"], "completed")
            await asend_image_update(2, status="failed", message="boom")
            assert [(await one.receive_json())["status"] for _ in range(2)] == ["processing", "completed"]
            # Dream 2's first message is its own update, so nothing of dream 1 leaked to it.
            other = await two.receive_json()
            assert (other["dream_id"], other["status"], other["message"]) == (2, "failed", "boom")


async def test_client_ping_gets_pong_with_echoed_timestamp(make_app: MakeApp) -> None:
    async with ConsumerTestClient(make_app()) as client, client.connect("/dreams/1") as ws:
        await _greeted(ws)
        await ws.send_json({"type": "ping", "timestamp": 1234.5})
        assert await ws.receive_json() == {"type": "pong", "timestamp": 1234.5}
        await ws.send_json({"type": "ping"})
        assert await ws.receive_json() == {"type": "pong"}


async def test_client_pong_gets_no_answer(make_app: MakeApp) -> None:
    async with ConsumerTestClient(make_app()) as client, client.connect("/dreams/1") as ws:
        await _greeted(ws)
        await ws.send_json({"type": "pong", "timestamp": 1})
        # The next message is the answer to this ping: the pong produced nothing.
        await _still_open(ws)


async def test_request_status_returns_the_latest_update(make_app: MakeApp) -> None:
    async with ConsumerTestClient(make_app()) as client:
        await asend_image_update(9, status="processing")
        await asend_image_update(9, ["9.png"], "completed", "ready")
        async with client.connect("/dreams/9") as ws:
            await _greeted(ws)
            await ws.send_json({"type": "request_status", "dream_id": 9})
            latest = await ws.receive_json()
            assert latest["type"] == "image_update"
            assert (latest["status"], latest["images"], latest["message"]) == ("completed", ["9.png"], "ready")
            await ws.send_json({"type": "request_status"})  # dream_id is optional
            assert (await ws.receive_json())["status"] == "completed"


async def test_request_status_of_a_dream_without_updates(make_app: MakeApp) -> None:
    async with ConsumerTestClient(make_app()) as client, client.connect("/dreams/5") as ws:
        await _greeted(ws)
        await ws.send_json({"type": "request_status"})
        answer = await ws.receive_json()
        assert (answer["type"], answer["code"]) == ("error", "status_unknown")
        await _still_open(ws)


@pytest.mark.parametrize("other", [6, "6", 0])
async def test_request_status_for_someone_elses_dream_is_forbidden(make_app: MakeApp, other: object) -> None:
    async with ConsumerTestClient(make_app()) as client:
        await asend_image_update(6, status="completed")
        async with client.connect("/dreams/5") as ws:
            await _greeted(ws)
            await ws.send_json({"type": "request_status", "dream_id": other})
            answer = await ws.receive_json()
            assert (answer["type"], answer["code"]) == ("error", "forbidden")
            await _still_open(ws)


BAD_FRAMES = {
    "not json": ("text", "{nope", "invalid_json"),
    "array": ("text", "[1, 2]", "invalid_message"),
    "number": ("text", "42", "invalid_message"),
    "no type": ("json", {"dream_id": 1}, "invalid_message"),
    "type not a string": ("json", {"type": 3}, "invalid_message"),
    "unknown type": ("json", {"type": "launch_rockets"}, "unknown_type"),
    "event handler name": ("json", {"type": "image_update", "status": "completed"}, "unknown_type"),
    "life-cycle name": ("json", {"type": "close"}, "unknown_type"),
    "dunder": ("json", {"type": "__init__"}, "unknown_type"),
    "bad request_status id": ("json", {"type": "request_status", "dream_id": [1]}, "invalid_message"),
    "binary": ("bytes", b"\x00\x01", "binary_not_supported"),
    "deep json": ("text", "[" * 100_000 + "]" * 100_000, None),
}


@pytest.mark.parametrize("case", sorted(BAD_FRAMES))
async def test_bad_input_gets_an_error_and_the_connection_stays_open(make_app: MakeApp, case: str) -> None:
    kind, payload, code = BAD_FRAMES[case]
    async with ConsumerTestClient(make_app(max_message_size=1_000_000)) as client:
        async with client.connect("/dreams/1") as ws:
            await _greeted(ws)
            if kind == "text":
                await ws.send_text(payload)  # type: ignore[arg-type]
            elif kind == "bytes":
                await ws.send_bytes(payload)  # type: ignore[arg-type]
            else:
                await ws.send_json(payload)
            answer = await ws.receive_json()
            assert answer["type"] == "error"
            if code is not None:
                assert answer["code"] == code
            assert isinstance(answer["message"], str) and answer["message"]
            await _still_open(ws)


async def test_frames_over_the_limit_close_with_1009(make_app: MakeApp) -> None:
    async with ConsumerTestClient(make_app(max_message_size=1024)) as client, client.connect("/dreams/1") as ws:
        await _greeted(ws)
        await ws.send_json({"type": "ping", "pad": "x" * 2000})
        code, messages = await ws.expect_close()
    assert code == 1009
    assert messages[-1]["code"] == "message_too_big"


async def test_bad_input_on_one_connection_does_not_affect_another(make_app: MakeApp) -> None:
    async with ConsumerTestClient(make_app(max_message_size=1024)) as client:
        async with client.connect("/dreams/1") as good, client.connect("/dreams/1") as bad:
            await _greeted(good)
            await _greeted(bad)
            await bad.send_text("x" * 5000)
            assert (await bad.expect_close())[0] == 1009
            await asend_image_update(1, status="completed")
            assert (await good.receive_json())["status"] == "completed"
            await _still_open(good)


@pytest.mark.parametrize("stamp", [float("nan"), float("inf"), float("-inf"), "\ud800", ["ok", "\udfff"]])
async def test_a_ping_timestamp_that_cannot_be_echoed_is_an_error(make_app: MakeApp, stamp: object) -> None:
    async with ConsumerTestClient(make_app()) as client:
        async with client.connect("/dreams/1") as ws:
            await _greeted(ws)
            # Sent as raw JSON: NaN/Infinity and lone surrogates are what a sloppy client emits.
            await ws.send_text(json.dumps({"type": "ping", "timestamp": stamp}))
            answer = await ws.receive_json()
            assert (answer["type"], answer["code"]) == ("error", "invalid_message")
            await _still_open(ws)
