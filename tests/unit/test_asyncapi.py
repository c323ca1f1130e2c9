"""The AsyncAPI document: valid AsyncAPI 3.0.0 (checked offline against the official schema),
and generated from the classes: handlers added or removed change it, real messages match it."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from jsonschema import Draft7Validator
from referencing import Registry, Resource
from starlette.applications import Starlette
from starlette.routing import Mount, Route

import starlette_dream_ws
from starlette_dream_ws import Consumer, DreamImagesConsumer, DreamWebSocketApp, image_update_message
from starlette_dream_ws.protocol import CloseCodes, ImageStatus, dream_group
from starlette_dream_ws.server.asyncapi import (
    asyncapi_document,
    asyncapi_endpoint,
    consumer_messages,
    request_document,
)
from starlette_dream_ws.server.jobs import JobConsumer
from starlette_dream_ws.server.schemas import CLOSE_CODE_MEANINGS, ERROR_CODES, MessageSchemas
from starlette_dream_ws.testing import ClientConnection, ConsumerTestClient

SPEC = Path(__file__).parent / "asyncapi" / "asyncapi-3.0.0.json"
DREAMS = {"/dreams/{dream_id:int}": DreamImagesConsumer}
DREAMS_ID = "dreams_dream_id"


def _offline(uri: str) -> Resource[Any]:
    raise LookupError(f"no network in these tests: {uri}")


@pytest.fixture(scope="module")
def validator() -> Draft7Validator:
    schema = json.loads(SPEC.read_text())
    # Every reference of the vendored schema is local (its `examples` are AsyncAPI documents, whose
    # references are data), and any other would fail, not fetch.
    assert all(ref.startswith("#/definitions/") for ref in _refs(schema, skip="examples"))
    Draft7Validator.check_schema(schema)
    return Draft7Validator(schema, registry=Registry(retrieve=_offline))


def _refs(node: Any, skip: str | None = None) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            elif key != skip:
                yield from _refs(value, skip)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item, skip)


def _pointer(document: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = document
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        assert isinstance(node, dict) and part in node, f"{ref} does not resolve"
        node = node[part]
    return node


def _assert_valid(validator: Draft7Validator, document: dict[str, Any]) -> None:
    errors = [f"{list(e.absolute_path)}: {e.message[:200]}" for e in validator.iter_errors(document)]
    assert errors == []
    # The schema only checks that references are strings: they must also lead somewhere.
    for ref in _refs(document):
        _pointer(document, ref)
    for operation in document["operations"].values():
        channel = operation["channel"]["$ref"]
        for message in operation["messages"]:
            assert message["$ref"].startswith(channel + "/messages/")
        for message in operation.get("reply", {}).get("messages", []):
            assert message["$ref"].startswith(operation["reply"]["channel"]["$ref"] + "/messages/")


def _payload(document: dict[str, Any], channel: str, key: str) -> dict[str, Any]:
    message = document["channels"][channel]["messages"][key]
    if "$ref" in message:
        message = _pointer(document, message["$ref"])
    payload: dict[str, Any] = message["payload"]
    return payload


def _kinds(document: dict[str, Any], channel: str, side: str) -> set[str]:
    return {key.split(".", 1)[1] for key in document["channels"][channel]["messages"] if key.startswith(side + ".")}


# -- a generic consumer: UUID path parameter, its own event and client messages -----------------


class RenderConsumer(Consumer):
    """Streams a render's progress."""

    message_schemas = MessageSchemas(
        sent={"render_update": {"properties": {"frame": {"type": "integer", "minimum": 0}}, "required": ["frame"]}},
        received={"cancel": {"description": "Stop the render.", "properties": {"reason": {"type": "string"}}}},
        replies={"cancel": ("render_update",)},
    )

    async def render_update(self, event: dict[str, Any]) -> None:
        """A frame was rendered."""
        await self.send_json(event)

    async def receive_cancel(self, content: dict[str, Any]) -> None:
        """Cancel the render; its last update follows."""

    async def receive_hello(self, content: dict[str, Any]) -> None:
        pass

    def helper(self) -> int:
        # Not a coroutine: no event can use it as a handler.
        return 1


RENDERS = {"/renders/{render_id:uuid}": RenderConsumer}
RENDERS_ID = "renders_render_id"


class VideoConsumer(JobConsumer):
    group_kind = "videos"

    async def video_update(self, event: dict[str, Any]) -> None:
        await self.send_json(event)


# -- valid AsyncAPI 3.0.0 -------------------------------------------------------------------


@pytest.mark.parametrize("options", [{}, {"mount": "/ws", "host": "example.com"}, {"events": False}])
def test_the_dreams_document_is_valid_asyncapi_3(validator: Draft7Validator, options: dict[str, Any]) -> None:
    document = asyncapi_document(DREAMS, **options)
    assert document["asyncapi"] == "3.0.0"
    _assert_valid(validator, document)


def test_a_generic_consumer_document_is_valid(validator: Draft7Validator) -> None:
    routes = {**RENDERS, "/videos/{video_id:uuid}": VideoConsumer, **DREAMS}
    _assert_valid(validator, asyncapi_document(routes, mount="/ws/", host="localhost:8000", secure=False))


def test_a_broken_document_fails_validation(validator: Draft7Validator) -> None:
    document = asyncapi_document(DREAMS)
    breakages: list[Callable[[dict[str, Any]], None]] = [
        lambda d: d.pop("info"),
        lambda d: d.update(asyncapi="2.6.0"),
        lambda d: d["operations"][f"{DREAMS_ID}.send.error"].update(action="publish"),
        lambda d: d["operations"][f"{DREAMS_ID}.send.error"].pop("channel"),
        lambda d: d["channels"][DREAMS_ID].update(subscribe={}),
        lambda d: d["channels"][DREAMS_ID]["parameters"]["dream_id"].update(schema={"type": "integer"}),
        lambda d: d["channels"][DREAMS_ID]["messages"]["server.error"]["payload"].update(type=12),
    ]
    for breakage in breakages:
        broken = copy.deepcopy(document)
        breakage(broken)
        assert not validator.is_valid(broken)


# -- channels, parameters, messages ---------------------------------------------------------


def test_one_websocket_and_one_event_stream_channel_per_route() -> None:
    document = asyncapi_document({**DREAMS, **RENDERS}, mount="/ws")
    channels = document["channels"]
    assert {channels[key]["address"] for key in channels} == {
        "/ws/dreams/{dream_id}",
        "/ws/dreams/{dream_id}/events",
        "/ws/renders/{render_id}",
        "/ws/renders/{render_id}/events",
    }
    dream_id = channels[DREAMS_ID]["parameters"]["dream_id"]
    assert dream_id["x-convertor"] == "int" and "[0-9]+" in dream_id["description"]
    assert channels[RENDERS_ID]["parameters"]["render_id"]["x-convertor"] == "uuid"
    assert channels[DREAMS_ID]["bindings"]["ws"]["method"] == "GET"
    assert set(channels[DREAMS_ID]["bindings"]["ws"]["query"]["properties"]) == {"token", "since"}


def test_channel_ids_stay_unique_and_streams_get_their_server(validator: Draft7Validator) -> None:
    # A WebSocket route whose path ends in /events, beside a route whose event stream has that path.
    document = asyncapi_document({"/x/events": RenderConsumer, "/x": RenderConsumer}, host="h")
    _assert_valid(validator, document)
    servers = {key: channel["servers"][0]["$ref"] for key, channel in document["channels"].items()}
    assert servers == {
        "x_events": "#/servers/websocket",
        "x_events_events": "#/servers/events",
        "x_2": "#/servers/websocket",
        "x_2_events": "#/servers/events",
    }


def test_the_dreams_messages_follow_the_consumer_class() -> None:
    document = asyncapi_document(DREAMS)
    assert _kinds(document, DREAMS_ID, "client") == {"ping", "pong", "request_status", "refresh_token"}
    assert _kinds(document, DREAMS_ID, "server") == {
        "connection_established",
        "error",
        "image_update",
        "ping",
        "pong",
        "token_refreshed",
    }
    # One way: no answers to client messages, and the heartbeat is a comment line.
    assert _kinds(document, f"{DREAMS_ID}_events", "server") == {"connection_established", "error", "image_update"}
    operations = document["operations"]
    assert operations[f"{DREAMS_ID}.receive.ping"]["action"] == "receive"
    assert operations[f"{DREAMS_ID}.send.image_update"]["action"] == "send"
    replies = {
        key.rsplit(".", 1)[1]: [m["$ref"].rsplit("/", 1)[1] for m in operation["reply"]["messages"]]
        for key, operation in operations.items()
        if "reply" in operation
    }
    assert replies == {
        "ping": ["server.pong"],
        "request_status": ["server.image_update", "server.error"],
        "refresh_token": ["server.token_refreshed"],
    }
    # Descriptions come from the handlers' docstrings.
    refresh = operations[f"{DREAMS_ID}.receive.refresh_token"]["description"]
    assert refresh.startswith("Replace the connection's token")


def test_image_update_is_built_from_the_protocol() -> None:
    update = _payload(asyncapi_document(DREAMS), DREAMS_ID, "server.image_update")
    assert update["properties"]["type"] == {"const": "image_update"}
    assert update["properties"]["status"]["enum"] == [status.value for status in ImageStatus]
    assert update["properties"]["progress"] == {
        "type": "integer",
        "minimum": 0,
        "maximum": 100,
        "description": "percent done, when known",
    }
    assert "progress" not in update["required"]


def test_a_generic_consumer_gets_its_handlers_and_declared_shapes() -> None:
    document = asyncapi_document(RENDERS)
    assert _kinds(document, RENDERS_ID, "client") == {"cancel", "hello"}
    assert _kinds(document, RENDERS_ID, "server") == {"error", "ping", "render_update"}
    frame = _payload(document, RENDERS_ID, "server.render_update")
    assert frame["required"] == ["type", "frame"]
    # Undeclared: any object of that type.
    assert _payload(document, RENDERS_ID, "client.hello") == {
        "type": "object",
        "properties": {"type": {"const": "hello"}},
        "required": ["type"],
    }
    operations = document["operations"]
    assert operations[f"{RENDERS_ID}.receive.cancel"]["description"] == "Cancel the render; its last update follows."
    assert operations[f"{RENDERS_ID}.send.render_update"]["description"] == "A frame was rendered."
    assert operations[f"{RENDERS_ID}.send.render_update"]["x-event-handler"] == "render_update"
    assert not any("helper" in key for key in operations)


def test_a_job_consumer_names_its_id_after_the_route() -> None:
    document = asyncapi_document({"/videos/{video_id:uuid}": VideoConsumer})
    greeting = _payload(document, "videos_video_id", "server.connection_established")
    assert greeting["properties"]["video_id"] == {"type": "string", "format": "uuid"}
    assert "video_id" in greeting["required"]
    status = document["operations"]["videos_video_id.receive.request_status"]["reply"]["messages"]
    assert [m["$ref"].rsplit("/", 1)[1] for m in status] == ["server.video_update", "server.error"]


# -- the document follows the code ----------------------------------------------------------


def test_a_handler_added_appears_and_one_removed_disappears() -> None:
    class Renders(RenderConsumer):
        async def receive_pause(self, content: dict[str, Any]) -> None:
            """Pause the render."""

        async def render_done(self, event: dict[str, Any]) -> None:
            await self.send_json(event)

    routes = {"/renders/{render_id:uuid}": Renders}
    document = asyncapi_document(routes)
    assert {"pause", "cancel", "hello"} <= _kinds(document, RENDERS_ID, "client")
    assert "render_done" in _kinds(document, RENDERS_ID, "server")
    assert "render_done" in _kinds(document, f"{RENDERS_ID}_events", "server")

    del Renders.receive_pause
    del Renders.render_done
    document = asyncapi_document(routes)
    assert "pause" not in _kinds(document, RENDERS_ID, "client")
    assert "render_done" not in _kinds(document, RENDERS_ID, "server")
    assert not any("pause" in key or "render_done" in key for key in document["operations"])


def test_an_answer_goes_with_the_handler_that_sends_it() -> None:
    class NoRefresh(DreamImagesConsumer):
        # Not callable: dispatch no longer finds a handler for `refresh_token`.
        receive_refresh_token = None  # type: ignore[assignment]

    messages = consumer_messages(NoRefresh, "/dreams/{dream_id:int}")
    assert "refresh_token" not in messages.received
    assert "token_refreshed" not in messages.sent
    assert "pong" in messages.sent


def test_reserved_and_private_methods_are_not_messages() -> None:
    messages = consumer_messages(DreamImagesConsumer, "/dreams/{dream_id:int}")
    # `receive_json` is the base class's dispatcher, `connect` its life cycle: no message reaches them.
    assert "json" not in messages.received
    assert not {"connect", "disconnect", "authorize", "receive_json"} & set(messages.sent)


# -- close and error codes ------------------------------------------------------------------


def test_every_close_code_appears_with_its_meaning() -> None:
    constants = {value for name, value in vars(CloseCodes).items() if name.isupper() and isinstance(value, int)}
    assert constants == set(CLOSE_CODE_MEANINGS)
    channel = asyncapi_document(DREAMS)["channels"][DREAMS_ID]
    assert {entry["code"] for entry in channel["x-close-codes"]} == constants
    for code in constants:
        assert f"| {code} |" in channel["description"]
    closing = {entry["close_code"] for entry in channel["x-error-codes"]} - {None}
    assert closing <= constants


#: Error codes of plain HTTP answers of the event stream (405, a refusal without a reason).
HTTP_ONLY_ERRORS = {"method_not_allowed", "closed"}
#: Where error codes are given: `send_error("code", ...)`, `CloseConnection(CODE, "code", ...)`...
ERROR_SITE = re.compile(r"(?:send_error|CloseConnection|BadFrame|error_message)\(\s*(?:[\w.]+,\s*)?\"([a-z_]+)\"")


def test_every_error_code_in_the_code_is_described() -> None:
    package = Path(starlette_dream_ws.__file__).parent
    used = {code for path in package.rglob("*.py") for code in ERROR_SITE.findall(path.read_text())}
    assert used, "the pattern finds nothing: update it"
    assert used - HTTP_ONLY_ERRORS <= set(ERROR_CODES)


# -- real messages match the document -------------------------------------------------------


def _check(document: dict[str, Any], message: dict[str, Any]) -> None:
    schema = _payload(document, DREAMS_ID, f"server.{message['type']}")
    errors = [e.message for e in Draft7Validator(schema).iter_errors(message)]
    assert errors == [], message


@pytest.mark.anyio
async def test_messages_of_a_live_connection_match_their_schemas(make_app: Callable[..., DreamWebSocketApp]) -> None:
    document = asyncapi_document(DREAMS)
    app = make_app()
    seen: set[str] = set()

    async def receive(ws: ClientConnection) -> dict[str, Any]:
        message = await ws.receive_json()
        _check(document, message)
        seen.add(message["type"])
        return message

    async with ConsumerTestClient(app) as client, client.connect("/dreams/5") as ws:
        await receive(ws)
        await client.publish(dream_group(5), image_update_message(5, ["a.png"], "processing", None, progress=40))
        assert (await receive(ws))["progress"] == 40
        await ws.send_json({"type": "ping", "timestamp": 1.5})
        await receive(ws)
        await ws.send_json({"type": "request_status"})
        await receive(ws)
        await ws.send_json({"type": "refresh_token", "token": client.token()})
        await receive(ws)
        await ws.send_json({"type": "no_such_type"})
        await receive(ws)
    assert seen == {"connection_established", "image_update", "pong", "token_refreshed", "error"}


# -- serving it -----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_the_endpoint_serves_the_document_for_its_mount_point(validator: Draft7Validator) -> None:
    endpoint = asyncapi_endpoint(request_document(DREAMS, title="Dreams"))
    app = Starlette(routes=[Mount("/ws", routes=[Route("/asyncapi.json", endpoint, methods=["GET"])])])
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="https://example.com") as http:
        response = await http.get("/ws/asyncapi.json")
        again = await http.get("/ws/asyncapi.json")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    document = response.json()
    assert again.json() == document
    _assert_valid(validator, document)
    assert document["info"]["title"] == "Dreams"
    assert document["channels"][DREAMS_ID]["address"] == "/ws/dreams/{dream_id}"
    assert document["servers"]["websocket"] == {
        "host": "example.com",
        "protocol": "wss",
        "security": [
            {"$ref": "#/components/securitySchemes/token_query"},
            {"$ref": "#/components/securitySchemes/bearer"},
        ],
    }
