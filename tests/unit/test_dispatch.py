"""`type` dispatch of the generic consumer, for client messages and group events."""

from __future__ import annotations

from typing import Any

import pytest

from starlette_dream_ws import CloseCodes, CloseConnection, Consumer, ConsumerApp
from starlette_dream_ws.testing import ConsumerTestClient
from tests.support.tokens import UNIT_SECRET as SECRET

pytestmark = pytest.mark.anyio


class ChatConsumer(Consumer):
    """A consumer that is not about dreams at all: a chat room per path."""

    async def authorize(self) -> bool:
        return True

    @property
    def room(self) -> str:
        return "room_" + self.scope["path_params"]["room"]

    async def connect(self) -> None:
        await super().connect()
        await self.group_add(self.room)
        await self.send_json({"type": "joined", "room": self.room})

    async def receive_say(self, content: dict[str, Any]) -> None:
        assert self.user is not None
        await self.layer.publish(self.room, {"type": "chat.message", "user": self.user.id, "text": content["text"]})

    async def receive_explode(self, content: dict[str, Any]) -> None:
        raise RuntimeError("handler bug")

    async def receive_leave(self, content: dict[str, Any]) -> None:
        raise CloseConnection(CloseCodes.NORMAL)

    async def chat_message(self, event: dict[str, Any]) -> None:
        await self.send_json({"type": "said", "user": event["user"], "text": event["text"]})

    async def broken_event(self, event: dict[str, Any]) -> None:
        raise RuntimeError("event handler bug")


def chat_app() -> ConsumerApp:
    return ConsumerApp({"/chat/{room}": ChatConsumer}, jwt_secret=SECRET)


async def test_client_and_group_messages_dispatch_by_type() -> None:
    async with ConsumerTestClient(chat_app()) as client:
        async with client.connect("/chat/lobby", user="ann") as ann, client.connect("/chat/lobby", user="bob") as bob:
            assert await ann.receive_json() == {"type": "joined", "room": "room_lobby"}
            assert await bob.receive_json() == {"type": "joined", "room": "room_lobby"}
            await ann.send_json({"type": "say", "text": "hello"})
            # "chat.message" reached chat_message() on both connections.
            assert await bob.receive_json() == {"type": "said", "user": "ann", "text": "hello"}
            assert await ann.receive_json() == {"type": "said", "user": "ann", "text": "hello"}


async def test_a_failing_client_handler_answers_error_and_keeps_the_connection() -> None:
    async with ConsumerTestClient(chat_app()) as client, client.connect("/chat/a") as ws:
        await ws.receive_json()
        await ws.send_json({"type": "explode"})
        assert (await ws.receive_json())["code"] == "internal_error"
        await ws.send_json({"type": "say", "text": "still here"})
        assert (await ws.receive_json())["text"] == "still here"


@pytest.mark.parametrize(
    "event_type", ["no_such_handler", "close", "connect", "receive_say", "send_json", "_teardown", "Chat.Message"]
)
async def test_group_events_without_a_handler_are_errors_not_calls(event_type: str) -> None:
    async with ConsumerTestClient(chat_app()) as client, client.connect("/chat/a") as ws:
        await ws.receive_json()
        await client.publish("room_a", {"type": event_type, "text": "x", "user": "mallory"})
        answer = await ws.receive_json()
        assert (answer["type"], answer["code"]) == ("error", "unknown_event")
        await ws.send_json({"type": "say", "text": "alive"})
        assert (await ws.receive_json())["text"] == "alive"


async def test_a_failing_event_handler_does_not_stop_later_events() -> None:
    async with ConsumerTestClient(chat_app()) as client, client.connect("/chat/a") as ws:
        await ws.receive_json()
        await client.publish("room_a", {"type": "broken_event"})
        await client.publish("room_a", {"type": "chat.message", "user": "x", "text": "after"})
        assert (await ws.receive_json())["text"] == "after"


async def test_close_connection_from_a_handler_closes_with_its_code() -> None:
    async with ConsumerTestClient(chat_app()) as client, client.connect("/chat/a") as ws:
        await ws.receive_json()
        await ws.send_json({"type": "leave"})
        code, messages = await ws.expect_close()
    assert (code, messages) == (1000, [])


async def test_base_consumer_denies_unless_a_subclass_authorizes() -> None:
    app = ConsumerApp({"/raw": Consumer}, jwt_secret=SECRET)
    async with ConsumerTestClient(app) as client, client.connect("/raw") as ws:
        code, messages = await ws.expect_close()
    assert code == 4403
    assert messages[0]["code"] == "forbidden"
