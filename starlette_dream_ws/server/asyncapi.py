"""The AsyncAPI 3.0 document of an app's consumers, generated from the consumer classes.

Nothing here restates the protocol: the messages a consumer takes are its `receive_<type>`
handlers and the events it forwards are its event handlers, both found with `dispatch`'s own
rules; their shapes come from the classes' `message_schemas` (`schemas.py`); close codes from
`CloseCodes`; the event stream's details from `sse.py`. A handler added to a class is in the
next document, one removed is gone.

Served by the app at `<mount>/asyncapi.json` when the `asyncapi` setting is on::

    Route("/asyncapi.json", asyncapi_endpoint(request_document(routes)), methods=["GET"])
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
from collections.abc import Awaitable, Callable, Mapping
from importlib import metadata
from typing import Any

from starlette.convertors import CONVERTOR_TYPES
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import compile_path

from ..protocol import SUBPROTOCOL, TOKEN_SUBPROTOCOL_PREFIX
from . import sse
from .consumer import Consumer
from .dispatch import CLIENT_PREFIX, EVENT_PREFIX, handler_name
from .outbox import PING
from .resume import LAST_EVENT_ID, SINCE_QUERY
from .schemas import (
    RouteInfo,
    SchemaSource,
    close_codes,
    declared,
    error_codes,
    payload,
    resolve,
    resolve_replies,
)

ASYNCAPI_VERSION = "3.0.0"
#: Versions of the bindings used (the AsyncAPI bindings each have their own).
WS_BINDING_VERSION = "0.1.0"
HTTP_BINDING_VERSION = "0.3.0"
#: The heartbeat message: over an event stream it is a comment line, not an event.
HEARTBEAT = str(PING["type"])
#: The message every consumer may send unasked, whatever the declared answers say.
ERROR = "error"
#: What a channel id may hold (AsyncAPI's component key pattern).
_NOT_ID = re.compile(r"[^A-Za-z0-9]+")


@dataclasses.dataclass(frozen=True)
class Message:
    """One message type of a consumer, in one direction."""

    kind: str
    payload: dict[str, Any]
    description: str | None


@dataclasses.dataclass(frozen=True)
class ConsumerMessages:
    """What a consumer class takes and sends at one route."""

    route: RouteInfo
    #: Client -> server, by type.
    received: dict[str, Message]
    #: Server -> client, by type.
    sent: dict[str, Message]
    #: Client message type -> the server message types that answer it.
    replies: dict[str, tuple[str, ...]]
    #: Sent types a client may get without asking: what an event stream (one way) carries.
    unprompted: tuple[str, ...]


# -- reading the classes --------------------------------------------------------------------


def client_message_types(cls: type[Consumer]) -> dict[str, str]:
    """Client message type -> handler name, for every `receive_<type>` dispatch would call."""
    found = {}
    for name in sorted(dir(cls)):
        kind = name.removeprefix(CLIENT_PREFIX)
        if kind != name and handler_name(CLIENT_PREFIX, kind, Consumer) == name and callable(getattr(cls, name)):
            found[kind] = name
    return found


def event_types(cls: type[Consumer]) -> tuple[str, ...]:
    """The group event types `cls` handles: its coroutine methods an event may name (not the
    base class's, not `receive_*`, not private)."""
    return tuple(
        name
        for name in sorted(dir(cls))
        if handler_name(EVENT_PREFIX, name, Consumer) == name and inspect.iscoroutinefunction(getattr(cls, name, None))
    )


def route_info(path: str, consumer: type[Consumer]) -> RouteInfo:
    """`path` as Starlette reads it: converters stripped, parameters with their converter names."""
    _, path_format, convertors = compile_path(path)
    names = {id(convertor): name for name, convertor in CONVERTOR_TYPES.items()}
    params = {param: names.get(id(conv), type(conv).__name__) for param, conv in convertors.items()}
    return RouteInfo(path=path_format, params=params, consumer=consumer, events=event_types(consumer))


def _doc(cls: type, name: str) -> str | None:
    return inspect.getdoc(getattr(cls, name)) or None


def consumer_messages(cls: type[Consumer], path: str) -> ConsumerMessages:
    """The messages of `cls` served at `path`: handlers found on the class, shapes declared."""
    route = route_info(path, cls)
    decl = declared(cls)

    def message(kind: str, source: SchemaSource | None, doc: str | None) -> Message:
        schema = resolve(source, route) if source is not None else None
        described = schema.get("description") if schema is not None else None
        return Message(kind, payload(kind, schema), doc or described)

    handlers = client_message_types(cls)
    received = {kind: message(kind, decl.received.get(kind), _doc(cls, name)) for kind, name in handlers.items()}
    declared_replies = {kind: resolve_replies(source, route) for kind, source in decl.replies.items()}
    replies = {kind: targets for kind, targets in declared_replies.items() if kind in received and targets}
    answers = {target for targets in replies.values() for target in targets}
    # A type declared only as an answer exists only while a handler that answers with it does.
    answer_only = {t for targets in declared_replies.values() for t in targets} - set(route.events) - {ERROR}
    kinds = sorted({*route.events, *(k for k in decl.sent if k not in answer_only or k in answers), *answers})
    sent = {
        kind: message(kind, decl.sent.get(kind), _doc(cls, kind) if kind in route.events else None) for kind in kinds
    }
    unprompted = tuple(kind for kind in kinds if kind not in answer_only and kind != HEARTBEAT)
    return ConsumerMessages(route, received, sent, replies, unprompted)


# -- the document ---------------------------------------------------------------------------


def _version() -> str:
    try:
        return metadata.version("starlette-dream-ws")
    except metadata.PackageNotFoundError:
        return "0.0.0"


def _table(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join("" if cell is None else str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _message_object(message: Message, direction: str) -> dict[str, Any]:
    result: dict[str, Any] = {"name": message.kind, "title": f"{message.kind} ({direction})"}
    if message.description:
        first, _, rest = message.description.partition("\n")
        if rest:
            result["summary"] = first
        result["description"] = message.description
    result["payload"] = message.payload
    return result


def _parameters(route: RouteInfo) -> dict[str, Any]:
    return {
        name: {
            "description": f"Path parameter, Starlette converter `{convertor}`"
            + (f" (matches `{CONVERTOR_TYPES[convertor].regex}`)." if convertor in CONVERTOR_TYPES else "."),
            "x-convertor": convertor,
        }
        for name, convertor in route.params.items()
    }


def _query_schema(messages: ConsumerMessages) -> dict[str, Any]:
    return {"type": "object", "properties": dict(declared(messages.route.consumer).query)}


def _channel_id(path: str, taken: Mapping[str, Any]) -> str:
    base = _NOT_ID.sub("_", path).strip("_") or "root"
    candidate, n = base, 1
    while candidate in taken or f"{candidate}_events" in taken:
        n += 1
        candidate = f"{base}_{n}"
    return candidate


def _ws_channel(messages: ConsumerMessages, address: str) -> dict[str, Any]:
    cls, route = messages.route.consumer, messages.route
    subprotocol = getattr(cls, "subprotocol", None)
    codes = close_codes()
    errors = error_codes()
    description = "\n\n".join(
        part
        for part in (
            inspect.getdoc(cls),
            "A WebSocket: JSON text frames, one object each, always with a string `type`. Client messages "
            "are dispatched on `type` (`.` in a type reads as `_`); an unknown type is answered with "
            "`error` `unknown_type`.",
            f"Authentication: `?token=<jwt>`, `Authorization: Bearer <jwt>`, or the subprotocols `{SUBPROTOCOL}` "
            f"and `{TOKEN_SUBPROTOCOL_PREFIX}<jwt>` (unless the app authenticates connections itself).",
            "Close codes:\n\n" + _table(("code", "name", "meaning"), [tuple(c.values()) for c in codes]),
            "`error` codes:\n\n" + _table(("code", "meaning", "then closes with"), [tuple(e.values()) for e in errors]),
        )
        if part
    )
    channel_messages: dict[str, Any] = {
        f"server.{kind}": _message_object(message, "server to client") for kind, message in messages.sent.items()
    }
    channel_messages.update(
        {f"client.{kind}": _message_object(message, "client to server") for kind, message in messages.received.items()}
    )
    headers: dict[str, Any] = {"Authorization": {"type": "string", "description": "`Bearer <jwt>`"}}
    if subprotocol:
        headers["Sec-WebSocket-Protocol"] = {
            "type": "string",
            "description": f"`{subprotocol}`, optionally with `{TOKEN_SUBPROTOCOL_PREFIX}<jwt>`",
        }
    channel: dict[str, Any] = {
        "address": address,
        "title": f"{cls.__name__} (WebSocket)",
        "description": description,
        "messages": channel_messages,
        "bindings": {
            "ws": {
                "method": "GET",
                "query": _query_schema(messages),
                "headers": {"type": "object", "properties": headers},
                "bindingVersion": WS_BINDING_VERSION,
            }
        },
        "x-close-codes": codes,
        "x-error-codes": errors,
    }
    if route.params:
        channel["parameters"] = _parameters(route)
    if subprotocol:
        channel["x-subprotocol"] = subprotocol
    return channel


def _sse_channel(messages: ConsumerMessages, address: str, ws_id: str) -> dict[str, Any]:
    cls, route = messages.route.consumer, messages.route
    resumes = SINCE_QUERY in declared(cls).query
    refusals = {**{str(code): status for code, status in sse.STATUS_BY_CODE.items()}, **sse.STATUS_BY_ERROR}
    parts = [
        f"The messages of `{cls.__name__}` as Server-Sent Events, one way, for networks that block "
        "WebSocket upgrades: same authentication (`Authorization: Bearer <jwt>` or `?token=<jwt>`), "
        "limits and heartbeat.",
        f"Each message is one event: `event:` its `type`, `data:` the same JSON as on the WebSocket, and "
        f"`id: <epoch>:<seq>` on updates. A `retry: {sse.RETRY_MS}` field comes once, first. The heartbeat "
        f"is a comment line (`{sse.PING_COMMENT.decode().strip()}`), not an event. Answers to client "
        "messages never come: the client sends none.",
        "A refusal comes before any event, as plain HTTP with the `error` message as JSON body:\n\n"
        + _table(("error code or close code", "HTTP status"), sorted(refusals.items())),
        "The stream ends (after an `error` event where there is a reason) when the server closes the "
        "connection; the client reconnects by itself. Methods other than GET get 405.",
    ]
    if resumes:
        parts.insert(2, f"Resume with `{LAST_EVENT_ID}` (`EventSource` sends it) or `?{SINCE_QUERY}=<epoch>:<seq>`.")
    channel: dict[str, Any] = {
        "address": address,
        "title": f"{cls.__name__} (Server-Sent Events)",
        "description": "\n\n".join(parts),
        "messages": {
            f"server.{kind}": {"$ref": f"#/channels/{ws_id}/messages/server.{kind}"} for kind in messages.unprompted
        },
        "x-refusal-statuses": refusals,
    }
    if route.params:
        channel["parameters"] = _parameters(route)
    return channel


def _ref(*parts: str) -> dict[str, str]:
    # Keys here are `[A-Za-z0-9._-]`: nothing to escape in the JSON pointer.
    return {"$ref": "#/" + "/".join(parts)}


def _operations(messages: ConsumerMessages, ws_id: str, sse_id: str | None) -> dict[str, Any]:
    operations: dict[str, Any] = {}
    for kind, message in messages.received.items():
        operation: dict[str, Any] = {
            "action": "receive",
            "channel": _ref("channels", ws_id),
            "title": f"Receive {kind}",
            "messages": [_ref("channels", ws_id, "messages", f"client.{kind}")],
        }
        if message.description:
            operation["description"] = message.description
        answers = [t for t in messages.replies.get(kind, ()) if t in messages.sent]
        if answers:
            operation["reply"] = {
                "channel": _ref("channels", ws_id),
                "messages": [_ref("channels", ws_id, "messages", f"server.{t}") for t in answers],
            }
        operations[f"{ws_id}.receive.{kind}"] = operation
    for kind, message in messages.sent.items():
        operation = {
            "action": "send",
            "channel": _ref("channels", ws_id),
            "title": f"Send {kind}",
            "messages": [_ref("channels", ws_id, "messages", f"server.{kind}")],
        }
        if kind in messages.route.events:
            operation["x-event-handler"] = kind
        if message.description:
            operation["description"] = message.description
        operations[f"{ws_id}.send.{kind}"] = operation
    if sse_id is None:
        return operations
    http = {"method": "GET", "query": _query_schema(messages), "bindingVersion": HTTP_BINDING_VERSION}
    for kind in messages.unprompted:
        operations[f"{sse_id}.send.{kind}"] = {
            "action": "send",
            "channel": _ref("channels", sse_id),
            "title": f"Send {kind} (event stream)",
            "messages": [_ref("channels", sse_id, "messages", f"server.{kind}")],
            "bindings": {"http": http},
        }
    return operations


def asyncapi_document(
    routes: Mapping[str, type[Consumer]],
    *,
    title: str = "Dream images status channels",
    version: str | None = None,
    description: str | None = None,
    mount: str = "",
    host: str | None = None,
    secure: bool = True,
    events: bool = True,
) -> dict[str, Any]:
    """The AsyncAPI 3.0.0 document of `routes` (path -> consumer class, as `ConsumerApp` takes).

    `mount` prefixes every address. With `host`, servers are listed (`wss`/`https`, or `ws`/`http`
    unless `secure`). `events`: each route is also served as Server-Sent Events at `<path>/events`.
    """
    mount = mount.rstrip("/")
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    streams: set[str] = set()
    for path, consumer in routes.items():
        messages = consumer_messages(consumer, path)
        ws_id = _channel_id(messages.route.path, channels)
        channels[ws_id] = _ws_channel(messages, mount + messages.route.path)
        sse_id = None
        if events:
            sse_id = f"{ws_id}_events"
            channels[sse_id] = _sse_channel(messages, mount + sse.events_path(messages.route.path), ws_id)
            streams.add(sse_id)
        operations.update(_operations(messages, ws_id, sse_id))
    document: dict[str, Any] = {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": title,
            "version": version or _version(),
            "description": description
            or "Status channels over WebSocket and Server-Sent Events, generated from the consumer classes.",
        },
        "defaultContentType": "application/json",
    }
    if host is not None:
        document["servers"] = _servers(host, secure, events)
        for channel_id, channel in channels.items():
            channel["servers"] = [_ref("servers", "events" if channel_id in streams else "websocket")]
    document["channels"] = channels
    document["operations"] = operations
    document["components"] = {"securitySchemes": SECURITY_SCHEMES}
    return document


SECURITY_SCHEMES: dict[str, Any] = {
    "token_query": {"type": "httpApiKey", "name": "token", "in": "query", "description": "the JWT as `?token=`"},
    "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
}


def _servers(host: str, secure: bool, events: bool) -> dict[str, Any]:
    security = [_ref("components", "securitySchemes", name) for name in SECURITY_SCHEMES]
    servers: dict[str, Any] = {
        "websocket": {"host": host, "protocol": "wss" if secure else "ws", "security": security},
    }
    if events:
        servers["events"] = {"host": host, "protocol": "https" if secure else "http", "security": security}
    return servers


# -- serving it -----------------------------------------------------------------------------

#: Makes the document for a request (which tells the mount point and the host).
DocumentFactory = Callable[[Request], Mapping[str, Any]]


def request_document(routes: Mapping[str, type[Consumer]], **options: Any) -> DocumentFactory:
    """A `DocumentFactory` for `routes`: the document as seen through the request's mount point
    (`root_path`) and host. Documents are kept for a few (mount, host) pairs: classes do not change
    while serving, and the Host header comes from clients, so the cache is small and bounded."""
    routes = dict(routes)

    @functools.lru_cache(maxsize=8)
    def build(mount: str, host: str, secure: bool) -> Mapping[str, Any]:
        return asyncapi_document(routes, mount=mount, host=host, secure=secure, **options)

    def factory(request: Request) -> Mapping[str, Any]:
        return build(str(request.scope.get("root_path", "")), request.url.netloc, request.url.scheme == "https")

    return factory


def asyncapi_endpoint(document_factory: DocumentFactory) -> Callable[[Request], Awaitable[Response]]:
    """A Starlette endpoint answering with the document as JSON."""

    async def asyncapi_json(request: Request) -> Response:
        return JSONResponse(document_factory(request))

    return asyncapi_json
