"""Message shapes as JSON Schema, declared once per consumer class (read by `asyncapi.py`).

A consumer class states the shapes of its messages in a `message_schemas` class attribute (a
`MessageSchemas`); a subclass states only what it adds or changes, since the declarations of
its bases are merged along the MRO. Which messages exist is not declared here but found from
the handlers (`asyncapi.py`): a shape for a handler that is gone is simply not used.

The common shapes of the protocol are built here from `protocol.py` (statuses, close codes,
positions), so that no other file writes them again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..protocol import _EPOCH, MAX_SEQ, CloseCodes, ImageStatus
from .resume import LAST_EVENT_ID, SINCE_QUERY

Schema = Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class RouteInfo:
    """What a declaration may depend on: the route a consumer class is served at."""

    #: The path without converters, as clients use it: `/dreams/{dream_id}`.
    path: str
    #: Path parameters, in order: name -> Starlette converter name (`int`, `uuid`, `str`...).
    params: Mapping[str, str]
    #: The consumer class served there.
    consumer: type
    #: The group event types the class handles (its event handlers).
    events: tuple[str, ...] = ()


#: A schema, or a function of the route that makes one (an id field named after the path).
SchemaSource = Schema | Callable[[RouteInfo], Schema]
#: The server messages answering a client message, or a function of the route that lists them.
ReplySource = Sequence[str] | Callable[[RouteInfo], Sequence[str]]


@dataclasses.dataclass(frozen=True)
class MessageSchemas:
    """JSON Schemas of a consumer's messages by `type`, from the server's point of view.

    Payload schemas need not repeat the `type` property: it is added from the key.
    """

    #: Messages the server sends (event handlers' messages, answers, the greeting...).
    sent: Mapping[str, SchemaSource] = dataclasses.field(default_factory=dict)
    #: Messages clients send (one per `receive_<type>` handler).
    received: Mapping[str, SchemaSource] = dataclasses.field(default_factory=dict)
    #: Client message type -> the server message types that answer it.
    replies: Mapping[str, ReplySource] = dataclasses.field(default_factory=dict)
    #: Query parameters of the handshake the consumer reads, by name.
    query: Mapping[str, Schema] = dataclasses.field(default_factory=dict)

    def __or__(self, other: MessageSchemas) -> MessageSchemas:
        """These declarations, with `other`'s added (and winning where both name a type)."""
        return MessageSchemas(
            sent={**self.sent, **other.sent},
            received={**self.received, **other.received},
            replies={**self.replies, **other.replies},
            query={**self.query, **other.query},
        )


def resolve(source: SchemaSource, route: RouteInfo) -> Schema:
    return source(route) if callable(source) else source


def resolve_replies(source: ReplySource, route: RouteInfo) -> tuple[str, ...]:
    return tuple(source(route) if callable(source) else source)


def payload(kind: str, schema: Schema | None) -> dict[str, Any]:
    """The payload schema of a message `kind`: `schema` with its `type` property pinned, or, with
    no declaration, any object of that type."""
    if schema is None:
        return {"type": "object", "properties": {"type": {"const": kind}}, "required": ["type"]}
    result = dict(schema)
    result.setdefault("type", "object")
    properties = {name: value for name, value in (result.get("properties") or {}).items() if name != "type"}
    result["properties"] = {"type": {"const": kind}, **properties}
    result["required"] = ["type", *(name for name in result.get("required") or () if name != "type")]
    return result


def message(description: str, properties: Mapping[str, Schema], *required: str) -> dict[str, Any]:
    """A message shape. Objects stay open: clients must ignore fields they do not know (v1.1
    added some; later versions may add more)."""
    return {"type": "object", "description": description, "properties": dict(properties), "required": list(required)}


# -- close and error codes ------------------------------------------------------------------

#: What each close code means (docs/PROTOCOL.md, "Close codes"); a test checks every code has one.
CLOSE_CODE_MEANINGS: Mapping[int, str] = {
    CloseCodes.NORMAL: "normal close",
    CloseCodes.GOING_AWAY: "server shutting down (going away)",
    CloseCodes.POLICY_VIOLATION: "policy violation (origin not allowed, too many messages, invalid id or `since`)",
    CloseCodes.MESSAGE_TOO_BIG: "frame too big",
    CloseCodes.INTERNAL_ERROR: "unexpected server error during the connection",
    CloseCodes.TRY_AGAIN_LATER: "try again later (backend unreachable, server overloaded, client too slow)",
    CloseCodes.UNAUTHENTICATED: "not authenticated / token expired",
    CloseCodes.FORBIDDEN: "not allowed to watch this",
    CloseCodes.HEARTBEAT_TIMEOUT: "heartbeat timeout",
}


def close_codes() -> list[dict[str, Any]]:
    """Every `CloseCodes` constant with its meaning, by code."""
    found = {value: name for name, value in vars(CloseCodes).items() if name.isupper() and isinstance(value, int)}
    return [
        {"code": code, "name": name, "description": CLOSE_CODE_MEANINGS.get(code, name.replace("_", " ").lower())}
        for code, name in sorted(found.items())
    ]


#: `error` codes: what each means, and the close code that follows it (None: the connection
#: stays open). The codes are string literals at their raise sites; they are listed here once.
ERROR_CODES: Mapping[str, tuple[str, int | None]] = {
    "unauthenticated": ("no valid token (or session)", CloseCodes.UNAUTHENTICATED),
    "token_expired": ("the token expired while connected", CloseCodes.UNAUTHENTICATED),
    "forbidden": (
        "not allowed to watch this (4403 at the handshake; alone for a `request_status` about another id)",
        CloseCodes.FORBIDDEN,
    ),
    "heartbeat_timeout": ("nothing received from the client in time", CloseCodes.HEARTBEAT_TIMEOUT),
    "message_too_big": ("a frame over `max_message_size`", CloseCodes.MESSAGE_TOO_BIG),
    "too_slow": ("the client reads too slowly to keep up", CloseCodes.TRY_AGAIN_LATER),
    "too_many_connections": ("the server or this user has too many connections", CloseCodes.TRY_AGAIN_LATER),
    "origin_not_allowed": ("the page's origin may not connect", CloseCodes.POLICY_VIOLATION),
    "rate_limited": (
        "too many messages: the frame is dropped; 1008 after `message_burst` drops in a row",
        CloseCodes.POLICY_VIOLATION,
    ),
    "unavailable": (
        "the backend is down (1013 at the handshake; alone when the latest state cannot be read)",
        CloseCodes.TRY_AGAIN_LATER,
    ),
    "invalid_dream_id": ("the dream id is not a positive integer", CloseCodes.POLICY_VIOLATION),
    "invalid_id": ("the job id cannot name a group", CloseCodes.POLICY_VIOLATION),
    "invalid_since": ("`since` is not `<epoch>:<seq>`", CloseCodes.POLICY_VIOLATION),
    "invalid_json": ("the frame is not valid JSON", None),
    "invalid_message": ("the frame is not a JSON object with a string `type`, or a field is wrong", None),
    "unknown_type": ("no handler for this client message type", None),
    "unknown_event": ("no handler for a group event type (a server-side mistake)", None),
    "binary_not_supported": ("a binary frame: send JSON text frames", None),
    "status_unknown": ("no update recorded for this id yet", None),
    "unsupported": ("`refresh_token` on a server that does not authenticate with tokens", None),
    "internal_error": ("unexpected server error (1011 when it ends the connection)", None),
}


def error_codes() -> list[dict[str, Any]]:
    return [
        {"code": code, "description": meaning, "close_code": close}
        for code, (meaning, close) in sorted(ERROR_CODES.items())
    ]


# -- common shapes --------------------------------------------------------------------------

#: The full-match pattern of an epoch, anchored for JSON Schema (which searches, not matches).
EPOCH_PATTERN = f"^{_EPOCH.pattern}$"
EPOCH: Schema = {"type": "string", "pattern": EPOCH_PATTERN, "description": "names one unbroken history"}
TIMESTAMP: Schema = {"type": "number", "description": "seconds since the epoch"}
ECHOED: Schema = {"description": "any JSON value, echoed in the `pong`"}

ERROR = message(
    "Bad input or a refused request; the connection stays open unless a close follows.",
    {
        "code": {"type": "string", "description": "machine-readable", "examples": sorted(ERROR_CODES)},
        "message": {"type": "string", "description": "human-readable"},
    },
    "code",
    "message",
)
SERVER_PING = message(
    "Heartbeat, every `heartbeat_interval` seconds (over Server-Sent Events, a comment line instead).",
    {"timestamp": TIMESTAMP},
    "timestamp",
)

#: What every consumer sends: errors and the heartbeat (`Consumer`).
BASE = MessageSchemas(
    sent={"error": ERROR, "ping": SERVER_PING},
    query={"token": {"type": "string", "description": "the JWT (browsers); also `Authorization: Bearer`"}},
)


def id_schema(convertor: str) -> dict[str, Any]:
    """An id as `JobConsumer` sends it: an `int` path parameter as a number, any other as text."""
    if convertor == "int":
        return {"type": "integer", "minimum": 0}
    if convertor == "uuid":
        return {"type": "string", "format": "uuid"}
    return {"type": "string"}


def job_id_field(route: RouteInfo) -> tuple[str, dict[str, Any]]:
    """The name and shape of a job consumer's id: its `id_param`, else the route's only parameter."""
    name = getattr(route.consumer, "id_param", None) or next(iter(route.params), "id")
    return name, id_schema(route.params.get(name, "str"))


def greeting(route: RouteInfo, id_field: tuple[str, Schema] | None = None) -> dict[str, Any]:
    name, schema = id_field or job_id_field(route)
    return message(
        "The first message, right after a successful handshake.",
        {
            name: schema,
            "heartbeat_interval": {"type": "number", "exclusiveMinimum": 0, "description": "seconds between pings"},
            "epoch": EPOCH,
            "seq": {"type": "integer", "minimum": 0, "maximum": MAX_SEQ, "description": "0 before the first update"},
            "recovered": {"type": "boolean", "description": "when resuming: whether every missed update follows"},
        },
        name,
        "heartbeat_interval",
    )


def request_status(route: RouteInfo, id_field: tuple[str, Schema] | None = None) -> dict[str, Any]:
    name, _ = id_field or job_id_field(route)
    return message(
        "Ask for the latest update (answered through the same ordered path as live updates).",
        {name: {"type": ["integer", "string"], "description": "if given, the connection's own id"}},
    )


SINCE: Schema = {
    "type": "string",
    "pattern": f"^{_EPOCH.pattern}:[0-9]{{1,16}}$",
    "description": f"`<epoch>:<seq>` of the last update applied, to resume (SSE: the `{LAST_EVENT_ID}` header wins)",
}

#: A job's stream: greeting, resume, `request_status`, `refresh_token`, ping/pong (`JobConsumer`).
JOBS = MessageSchemas(
    sent={
        "connection_established": greeting,
        "pong": message("Answer to a client `ping`.", {"timestamp": ECHOED}),
        "token_refreshed": message(
            "Answer to `refresh_token`.",
            {"expires_at": {"type": ["number", "null"], "description": "the new token's `exp`"}},
            "expires_at",
        ),
    },
    received={
        "ping": message("Liveness check, answered with `pong`.", {"timestamp": ECHOED}),
        "pong": message("Liveness only (any frame counts); no answer.", {"timestamp": ECHOED}),
        "request_status": request_status,
        "refresh_token": message(
            "Replace the token before it expires (same user; authorized again).",
            {"token": {"type": "string", "description": "the new JWT"}},
            "token",
        ),
    },
    replies={
        "ping": ("pong",),
        "request_status": lambda route: (*route.events, "error"),
        "refresh_token": ("token_refreshed",),
    },
    query={SINCE_QUERY: SINCE},
)

DREAM_ID: Schema = {"type": "integer", "minimum": 1}

IMAGE_UPDATE = message(
    "An update of the dream; also the answer to `request_status`.",
    {
        "dream_id": DREAM_ID,
        "status": {"type": "string", "enum": [status.value for status in ImageStatus]},
        "images": {"type": "array", "items": {"type": "string"}, "description": "image URLs"},
        "timestamp": {**TIMESTAMP, "description": "set by the producer, seconds since the epoch"},
        "message": {"type": ["string", "null"]},
        "progress": {"type": "integer", "minimum": 0, "maximum": 100, "description": "percent done, when known"},
        "seq": {"type": "integer", "minimum": 1, "maximum": MAX_SEQ, "description": "1 for the dream's first"},
        "epoch": EPOCH,
    },
    "dream_id",
    "status",
    "images",
    "timestamp",
    "message",
    "seq",
    "epoch",
)

#: The dream images stream (`DreamImagesConsumer`): integer ids, `image_update`.
DREAMS = MessageSchemas(
    sent={
        "connection_established": lambda route: greeting(route, ("dream_id", DREAM_ID)),
        "image_update": IMAGE_UPDATE,
    },
    received={"request_status": lambda route: request_status(route, ("dream_id", DREAM_ID))},
)


def declared(cls: type) -> MessageSchemas:
    """The declarations of `cls` and its bases merged, subclasses winning."""
    merged = MessageSchemas()
    for klass in reversed(cls.__mro__):
        own = vars(klass).get("message_schemas")
        if isinstance(own, MessageSchemas):
            merged = merged | own
    return merged
