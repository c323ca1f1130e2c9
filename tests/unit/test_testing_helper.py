"""The README's example of testing an integrator's app with `ConsumerTestClient`."""

from __future__ import annotations

import pytest

from starlette_dream_ws import DreamWebSocketApp, User, asend_image_update
from starlette_dream_ws.testing import ConsumerTestClient

pytestmark = pytest.mark.anyio


async def can_watch(user: User, dream_id: int) -> bool:
    return user.id == "alice"


async def test_the_owner_sees_updates_and_others_are_refused() -> None:
    app = DreamWebSocketApp(authorize=can_watch, jwt_secret="a-test-secret-of-at-least-32-bytes")
    async with ConsumerTestClient(app) as client:
        async with client.connect("/dreams/1", user="alice") as ws:
            assert (await ws.receive_json())["type"] == "connection_established"
            await asend_image_update(1, ["a.png"], "completed")
            assert (await ws.receive_json())["status"] == "completed"
        async with client.connect("/dreams/1", user="mallory") as ws:
            code, _ = await ws.expect_close()
            assert code == 4403


@pytest.mark.parametrize("transport", ["query", "header", "subprotocol"])
async def test_client_publish_and_token_transports(transport: str) -> None:
    app = DreamWebSocketApp(authorize=can_watch, jwt_secret="a-test-secret-of-at-least-32-bytes")
    async with ConsumerTestClient(app) as client:
        async with client.connect("/dreams/2", user="alice", transport=transport) as ws:  # type: ignore[arg-type]
            await ws.receive_until("connection_established")
            await client.publish("dream_images_2", {"type": "image_update", "dream_id": 2, "status": "failed"})
            assert (await ws.receive_until("image_update"))["status"] == "failed"
