"""Property-based tests: arbitrary client frames thrown at `DreamImagesConsumer`, in-process.

Each test runs one app and one `ConsumerTestClient` for all its examples, with two connections
to dream 7: a well-behaved *watcher* opened before the fuzzing, and the *fuzzed* connection,
reopened only after the server closed it. For every frame an oracle (below, written from
docs/PROTOCOL.md, not from the code) says what the server must do; the frame is sent together
with a probe `ping` and the answers are checked:

* the expected reply (`pong` echoing the timestamp exactly, the dream's latest `image_update` or
  `status_unknown`, `forbidden` for another dream, `token_refreshed`), or nothing for `pong`;
* or an `error` with the expected string `code` and a non-empty string `message`;
* or a close with the documented code: 1009 (after `message_too_big`) for an oversize frame,
  4401 (after `unauthenticated`) for a bad refresh token, nothing else;
* never `internal_error` or 1011, and every server frame is a strict JSON object;
* then the probe's `pong`: the connection is still usable after an `error`.

After each example an update is published with `asend_image_update`: the watcher (and the
fuzzed connection) must receive it, so bad input on one connection never affects another. The
package's loggers must log nothing at ERROR level and no traceback.

The transport (wsproto, as any real server) encodes text frames as strict UTF-8, so lone
surrogates cannot be sent as text frames; they reach the server only as JSON escapes
(`"\\ud800"`), which the strategies produce. Inputs that hit a known, open package bug are not
sent (they are counted as "known bug" skips); each open bug has a strict `xfail` test at the end
of this file, and each fixed one a regression test.

`DREAM_WS_FUZZ_EXAMPLES` sets the examples per test (default 200: the file runs in about 15 s).
The number of cases (frames sent and handshakes) is printed at the end of the module and
recorded as `fuzz_cases` in each test's `user_properties`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import math
import os
import re
import time
import warnings
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import jwt
import pytest
from httpx_ws import WebSocketDisconnect, WebSocketNetworkError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from starlette_dream_ws import DreamWebSocketApp, asend_image_update
from starlette_dream_ws.server.dreams import DreamImagesConsumer
from starlette_dream_ws.testing import ClientConnection, ConsumerTestClient
from tests.support.tokens import UNIT_SECRET as SECRET

MakeApp = Callable[..., DreamWebSocketApp]

EXAMPLES = int(os.environ.get("DREAM_WS_FUZZ_EXAMPLES", "200"))
LIMIT = 4096  # max_message_size of the fuzzed app: small, for speed
DREAM = 7
FUZZ_USER = "fuzzer"
WATCHER = "watcher"
TIMEOUT = 5.0  # seconds for any expected answer: a hang fails the example instead of the run
#: Nesting deeper than this may exceed Python's recursion limit in the server's `json.loads`
#: (how deep depends on the stack below the connection's task): `invalid_json` is then allowed.
LENIENT_DEPTH = 300
#: Close codes of the protocol (docs/PROTOCOL.md).
DOCUMENTED_CLOSES = {1000, 1001, 1008, 1009, 1013, 4401, 4403, 4408}
#: Closes that timers and limits may cause at any moment, with the error that must precede them.
TIMER_CLOSES = {1013: "too_slow", 4408: "heartbeat_timeout", 4401: "token_expired", 1008: "rate_limited"}
HANDLED = {"ping", "pong", "request_status", "refresh_token"}
HOST = "testserver"  # the Host header of ConsumerTestClient's requests

#: Frames sent, examples run, and notable outcomes, over the whole module.
FUZZ_COUNTS: collections.Counter[str] = collections.Counter()

FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)

# -- strategies ------------------------------------------------------------------------------

EDGE_CHARS = [
    "\x00",
    "\x1f",
    "\x7f",
    "\u200f",  # RIGHT-TO-LEFT MARK
    "\u202e",  # RIGHT-TO-LEFT OVERRIDE
    "\u2066",  # LEFT-TO-RIGHT ISOLATE
    "\u200b",  # ZERO WIDTH SPACE
    "\ufeff",  # BOM
    "\u2028",  # LINE SEPARATOR (not valid in JS string literals before ES2019)
    "\ufffd",
    "\uffff",
    "\U0010ffff",
    "e\u0301",
    "\U0001f600",
    "\U0001f468\u200d\U0001f469\u200d\U0001f467",  # a ZWJ family
    "\U0001f1fa\U0001f1f8",  # a flag
    "\u0627\u0644\u0639\u0631\u0628\u064a\u0629",  # Arabic
    '"',
    "\\",
    "\n",
    "{",
    "]",
]
#: Only inside JSON strings: a text frame cannot carry them, a JSON escape can.
SURROGATES = ["\ud800", "\udbff", "\udc00", "\udfff"]

#: Strings of any characters, with the edge cases (some are several code points) mixed in.
frame_text = st.lists(st.one_of(st.characters(codec="utf-8"), st.sampled_from(EDGE_CHARS)), max_size=40).map("".join)
json_text = st.lists(st.one_of(st.characters(), st.sampled_from(EDGE_CHARS + SURROGATES)), max_size=40).map("".join)

METHOD_NAMES = sorted(
    {name for cls in DreamImagesConsumer.__mro__ for name in vars(cls)}
    | {name.removeprefix("receive_") for cls in DreamImagesConsumer.__mro__ for name in vars(cls)}
    | {
        "close",
        "connect",
        "accept",
        "disconnect",
        "image_update",
        "receive_json",
        "_teardown",
        "__class__",
        "send_json",
        "image.update",
        "receive.json",
        "request.status",
        "refresh.token",
        "ping.",
        ".ping",
        "ping..",
        "Ping",
        "PING",
        " ping",
        "ping ",
        "ping\x00",
        "p\u0131ng",  # dotless i
        "\uff50ing",  # fullwidth p
        "group.add",
        "send.error",
        "close.soon",
        "run",
        "deliver",
        "heartbeat",
        "x" * 64,
        "x" * 65,
    }
)
type_names = st.one_of(
    st.sampled_from(METHOD_NAMES),
    st.from_regex(r"[a-z][a-z0-9_.]{0,63}", fullmatch=True),
    json_text,
)
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(),  # NaN and infinities included: Python's json writes them as NaN / Infinity
    json_text,
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(json_text, inner, max_size=5),
    max_leaves=20,
)
#: Number literals as text, so the exact spelling reaches the server.
RAW_NUMBERS = [
    "1e400",
    "-1e400",
    "1e-400",
    "NaN",
    "Infinity",
    "-Infinity",
    "-0",
    "-0.0",
    "0e0",
    "1E+2",
    "5e-324",
    "1.7976931348623157e308",
    "123456789012345678901234567890",
    "9" * 3000,
    "0.1",
    "1.0",
    "01",
    "+1",
    ".5",
    "0x10",
]


def _dumps(value: Any, *, ensure_ascii: bool = False) -> str:
    text = json.dumps(value, ensure_ascii=ensure_ascii)
    if not ensure_ascii and not _encodable(text):
        # Lone surrogates cannot travel in a text frame: send them as JSON escapes.
        text = json.dumps(value)
    return text


def _encodable(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


@st.composite
def deep_json(draw: st.DrawFn, max_depth: int = 2040) -> str:
    """Arrays or objects nested near (and past) the recursion limit, as text."""
    depth = draw(st.one_of(st.integers(1, max_depth), st.integers(max(1, LENIENT_DEPTH - 50), 1100)))
    inner = draw(st.sampled_from(["", "0", '"x"', "null", "{}"]))
    if draw(st.booleans()):
        return "[" * depth + inner + "]" * depth
    depth = min(depth, 650)  # '{"a":' ... '}' is six bytes a level
    return '{"a":' * depth + (inner or "1") + "}" * depth


@st.composite
def huge_array(draw: st.DrawFn) -> str:
    """Arrays of many small elements, up to the size limit."""
    element = draw(st.sampled_from(["0", "1e400", "null", '""', "[]", "{}", '"\\ud800"', "-0"]))
    count = draw(st.integers(0, LIMIT // (len(element) + 1) - 40))
    return "[" + ",".join([element] * count) + "]"


def _raw_object(pairs: list[tuple[str, str]]) -> str:
    return "{" + ",".join(f"{json.dumps(key)}:{value}" for key, value in pairs) + "}"


#: JSON value texts, of every shape, for top-level frames and for message fields.
value_texts = st.one_of(
    json_values.map(_dumps),
    json_values.map(lambda value: _dumps(value, ensure_ascii=True)),
    st.sampled_from(RAW_NUMBERS),
    deep_json(),
    huge_array(),
)
duplicate_key_objects = st.lists(
    st.tuples(
        st.sampled_from(["type", "timestamp", "dream_id", "token", "TYPE", "type\x00", ""]),
        st.one_of(st.sampled_from(['"ping"', '"request_status"', '"refresh_token"', '"pong"']), value_texts),
    ),
    min_size=1,
    max_size=5,
).map(_raw_object)


@st.composite
def oversized_texts(draw: st.DrawFn) -> str:
    """Text frames whose UTF-8 size is near the limit, on either side of it."""
    char = draw(st.sampled_from(["x", "\x00", "\u00e9", "\u20ac", "\U0001f600", "\u200f"]))
    size = draw(st.integers(LIMIT - 40, LIMIT + 40))
    body = char * max(0, (size - 30) // len(char.encode()))
    if draw(st.booleans()):
        return body + draw(st.sampled_from(["", "x", "\u00e9"]))
    return _dumps({"type": draw(st.sampled_from(["ping", "pong", "nope"])), "pad": body})


def _token(claims: dict[str, Any], key: str = SECRET, algorithm: str = "HS256") -> str:
    return jwt.encode(claims, key, algorithm=algorithm)


def _exp(offset: int) -> int:
    return int(time.time()) + offset


@st.composite
def tokens(draw: st.DrawFn) -> Any:
    """Refresh tokens: valid ones for the connection's user, and every way to be wrong."""
    later = st.integers(120, 10**7)
    kind = draw(st.integers(0, 11))
    if kind == 0:
        return _token({"sub": FUZZ_USER, "exp": _exp(draw(later))})
    if kind == 1:
        return _token({"sub": draw(st.sampled_from([WATCHER, "admin", "", "fuzzer ", "FUZZER"])), "exp": _exp(60)})
    if kind == 2:
        return _token({"sub": FUZZ_USER, "exp": _exp(-draw(later))})  # expired
    if kind == 3:
        return _token({"sub": FUZZ_USER, "exp": _exp(3600)}, key="another-secret-of-at-least-32-bytes!!")
    if kind == 4:
        return jwt.encode({"sub": FUZZ_USER, "exp": _exp(3600)}, None, algorithm="none")
    if kind == 5:
        with warnings.catch_warnings():  # PyJWT finds the secret short for HS512: so much the better
            warnings.simplefilter("ignore")
            return _token({"sub": FUZZ_USER, "exp": _exp(3600)}, algorithm="HS512")  # not in the allowlist
    if kind == 6:
        return _token({"sub": FUZZ_USER})  # no exp
    if kind == 7:
        token = _token({"sub": FUZZ_USER, "exp": _exp(3600)})
        at = draw(st.integers(0, len(token) - 1))
        return token[:at] + draw(st.sampled_from("A_-.=x")) + token[at + 1 :]
    if kind == 8:
        sub = draw(st.one_of(st.integers(), st.booleans(), st.none(), st.lists(st.integers())))
        return _token({"sub": sub, "exp": _exp(3600)})  # a user id of the wrong kind
    if kind == 9:
        return ".".join(draw(st.lists(st.text("abcXYZ019-_=", max_size=20), min_size=1, max_size=4)))
    if kind == 10:
        return draw(json_text)
    return draw(json_values)  # not a string at all


# -- frames ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Frame:
    payload: str | bytes

    def __repr__(self) -> str:  # shrunk examples read better short
        shown = self.payload if len(self.payload) <= 200 else self.payload[:200]
        return f"Frame({shown!r}{'...' if len(self.payload) > 200 else ''}, {len(self.payload)} long)"


def _message(**fields: Any) -> str:
    return _dumps(fields)


binary_frames = st.one_of(
    st.binary(max_size=64),
    st.binary(min_size=LIMIT - 4, max_size=LIMIT + 4),
    st.integers(LIMIT - 2, LIMIT + 2).map(bytes),
    st.sampled_from([b'{"type":"ping"}', b"\xff\xfe", b"\xed\xa0\x80", b""]),
).map(Frame)

text_frames = st.one_of(
    frame_text,
    st.sampled_from(["", " ", "{", "}", "[", "{nope", "{'type': 'ping'}", '{"type":"ping",}', "\ufeff{}", "null"]),
    st.sampled_from(['{"type":"ping"} // c', '/* c */{"type":"ping"}', '{"type":"ping"}\x00', '{"type":"ping"}\n']),
    oversized_texts(),
).map(Frame)

json_frames = st.one_of(
    value_texts,
    duplicate_key_objects,
    value_texts.map(lambda v: '{"type":"ping","timestamp":' + v + "}"),
    value_texts.map(lambda v: '{"type":"pong","timestamp":' + v + "}"),
    value_texts.map(lambda v: '{"type":"unknown","payload":' + v + "}"),
    value_texts.map(lambda v: '{"type":"request_status","dream_id":' + v + "}"),
    value_texts.map(lambda v: '{"type":"refresh_token","token":' + v + "}"),
    value_texts.map(lambda v: '{"type":' + v + "}"),
).map(Frame)


def _typed(kind: Any, extra: dict[str, Any]) -> Frame:
    return Frame(_dumps({**extra, "type": kind}))


type_frames = st.builds(
    _typed,
    st.one_of(
        st.sampled_from(METHOD_NAMES),  # twice as likely as in type_names alone
        type_names,
        st.integers(),
        st.none(),
        st.booleans(),
        st.floats(allow_nan=False),
        st.lists(type_names, max_size=3),
        st.dictionaries(type_names, type_names, max_size=3),
    ),
    st.dictionaries(st.sampled_from(["timestamp", "dream_id", "token", "x"]), json_values, max_size=2),
)

dream_ids = st.one_of(
    st.just(DREAM),
    st.just(str(DREAM)),
    st.integers(),
    st.sampled_from([0, -DREAM, DREAM + 1, 2**63, "07", " 7", "7 ", "+7", "7.0", "\u0667", "\uff17", "", "7\x00"]),
    st.floats(),
    json_values,
)


def _status_request(dream_id: Any, present: bool) -> Frame:
    return Frame(_message(type="request_status", dream_id=dream_id) if present else _message(type="request_status"))


request_status_frames = st.one_of(
    st.builds(_status_request, dream_ids, st.booleans()),
    st.sampled_from(RAW_NUMBERS).map(lambda n: Frame('{"type":"request_status","dream_id":' + n + "}")),
    st.sampled_from(['{"type":"request.status"}', '{"type":"request_status","dream_id":7,"dream_id":8}']).map(Frame),
)

timestamps = st.one_of(
    json_values,
    st.floats(),
    st.integers(min_value=-(10**40), max_value=10**40),
    frame_text,
    json_text,
    st.sampled_from(SURROGATES),
    st.integers(LIMIT - 200, LIMIT - 40).map(lambda n: "\u00e9" * (n // 2)),
)
ping_frames = st.one_of(
    st.builds(lambda ts: Frame(_message(type="ping", timestamp=ts)), timestamps),
    st.sampled_from(RAW_NUMBERS).map(lambda n: Frame('{"type":"ping","timestamp":' + n + "}")),
    huge_array().map(lambda a: Frame('{"type":"ping","timestamp":' + a + "}")),
    deep_json().map(lambda d: Frame('{"type":"ping","timestamp":' + d + "}")),
    st.just(Frame('{"type":"ping"}')),
)

#: Origin headers: what browsers send, the host's own, and malformed ones. Printable ASCII:
#: httpx (as any client) refuses control characters in headers, and strips spaces at the ends.
origin_chars = st.characters(min_codepoint=0x21, max_codepoint=0x7E)
origins = st.one_of(
    st.sampled_from(
        [
            f"http://{HOST}",
            f"https://{HOST}",
            f"http://{HOST.upper()}",
            f"http://{HOST}:80",
            f"http://{HOST}.evil.example",
            f"http://evil.example#{HOST}",
            f"http://user@{HOST}",
            f"http://{HOST}/path",
            "null",
            "file://",
            "http://[::1]",
            "http://[::1",
            "http://[",
            "http://]",
            "https://app.example",
            "*",
        ]
    ),
    st.builds(
        lambda scheme, host: f"{scheme}://{host}",
        st.sampled_from(["http", "https", "ws", "x"]),
        st.text(origin_chars, max_size=20),
    ),
    st.text(origin_chars, min_size=1, max_size=30),
)

refresh_frames = st.builds(lambda token: Frame(_message(type="refresh_token", token=token)), tokens())

all_frames = st.one_of(
    binary_frames, text_frames, json_frames, type_frames, request_status_frames, ping_frames, refresh_frames
)

# -- the oracle ------------------------------------------------------------------------------


def _nesting(text: str) -> int:
    """The deepest bracket nesting of a JSON text, outside strings."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def _walk(value: Any) -> Iterator[Any]:
    """Every value and key inside `value`, without recursion."""
    stack = [value]
    while stack:
        item = stack.pop()
        yield item
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _known_bug(content: Any) -> str | None:
    """The open package bug this message would hit, if any (none is open now)."""
    return None


def _json_text(value: Any) -> bool:
    """Can `value` be written as strict JSON in a text frame (no NaN/Infinity, no lone surrogate)?"""
    for item in _walk(value):
        if isinstance(item, float) and not math.isfinite(item):
            return False
        if isinstance(item, str) and not _encodable(item):
            return False
    return True


@dataclass(frozen=True)
class Outcome:
    """One acceptable answer to a frame."""

    kind: str  # "reply", "error", "silent", "close", "refreshed"
    value: Any = None  # the reply, the error code, the close code, or the token's exp
    error: str | None = None  # for "close": the error sent first


def _user_of(token: str) -> Any:
    """The token's user if the app must accept it as a refresh token, else None."""
    try:
        claims = jwt.decode(token, SECRET, algorithms=["HS256"], options={"require": ["exp"], "verify_sub": False})
    except Exception:
        return None
    return claims


def expected(frame: Frame, latest: dict[str, Any] | None) -> tuple[list[Outcome], str | None]:
    """What the server may answer to `frame` (the dream's latest update is `latest`), and a
    known bug the frame would hit instead."""
    payload = frame.payload
    if isinstance(payload, bytes):
        if len(payload) > LIMIT:
            return [Outcome("close", 1009, "message_too_big")], None
        return [Outcome("error", "binary_not_supported")], None
    if len(payload.encode()) > LIMIT:
        return [Outcome("close", 1009, "message_too_big")], None
    lenient = [Outcome("error", "invalid_json")] if _nesting(payload) > LENIENT_DEPTH else []
    try:
        content = json.loads(payload)
    except (ValueError, RecursionError):
        return [Outcome("error", "invalid_json")], None
    bug = _known_bug(content)
    if not isinstance(content, dict) or not isinstance(content.get("type"), str):
        return [Outcome("error", "invalid_message"), *lenient], bug
    kind = content["type"].replace(".", "_")
    if kind not in HANDLED or not re.fullmatch(r"[a-z][a-z0-9_.]{0,63}", content["type"]):
        return [Outcome("error", "unknown_type"), *lenient], bug
    if kind == "ping":
        if "timestamp" not in content:
            return [Outcome("reply", {"type": "pong"}), *lenient], bug
        stamp = content["timestamp"]
        refused = Outcome("error", "invalid_message")
        if not _json_text(stamp):
            # NaN, Infinity (1e400) or a lone surrogate cannot be echoed as JSON text.
            return [refused, *lenient], bug
        if lenient:  # so deep that encoding the pong may exceed the recursion limit
            return [Outcome("reply", {"type": "pong", "timestamp": stamp}), refused, *lenient], bug
        return [Outcome("reply", {"type": "pong", "timestamp": stamp})], bug
    if kind == "pong":
        return [Outcome("silent"), *lenient], bug
    if kind == "request_status":
        requested = content.get("dream_id", DREAM)
        if isinstance(requested, bool) or not isinstance(requested, int | str):
            return [Outcome("error", "invalid_message"), *lenient], bug
        if str(requested) != str(DREAM):
            return [Outcome("error", "forbidden"), *lenient], bug
        answer = Outcome("error", "status_unknown") if latest is None else Outcome("reply", latest)
        return [answer, Outcome("error", "unavailable"), *lenient], bug
    token = content.get("token")
    if not isinstance(token, str):
        return [Outcome("error", "invalid_message"), *lenient], bug
    claims = _user_of(token)
    sub = None if claims is None else claims.get("sub")
    if isinstance(sub, str | int) and not isinstance(sub, bool) and str(sub) == FUZZ_USER:
        assert claims is not None
        return [Outcome("refreshed", claims["exp"]), *lenient], bug
    return [Outcome("close", 4401, "unauthenticated"), *lenient], bug


CANONICAL_ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://[a-z0-9.-]+(:[0-9]{1,5})?", re.IGNORECASE)


def origin_expected(origin: str) -> tuple[bool | None, str | None]:
    """May a browser page of `origin` connect with the default (empty) allowlist? `None`: the
    protocol does not say (not an origin a browser sends). And a known bug it would hit."""
    try:
        urlsplit(origin)
    except ValueError:  # e.g. "http://[::1": refused like any origin not allowed
        return False, None
    if origin == "null" or not CANONICAL_ORIGIN.fullmatch(origin):
        return (False if origin == "null" else None), None
    return origin.split("://", 1)[1].lower() == HOST, None


# -- checking answers ------------------------------------------------------------------------


def _no_constants(name: str) -> Any:
    raise ValueError(f"not JSON: {name}")


def _canonical(value: Any) -> str:
    """Tells apart what `==` does not (1 and True, 0.0 and -0.0, 1 and 1.0)."""
    return json.dumps(value, allow_nan=False)


def _check_message(message: Any) -> None:
    assert isinstance(message, dict), message
    assert isinstance(message.get("type"), str), message
    if message["type"] == "error":
        assert isinstance(message.get("code"), str) and message["code"], message
        assert isinstance(message.get("message"), str) and message["message"], message
        assert message["code"] != "internal_error", message


def _matches(outcome: Outcome, messages: list[dict[str, Any]], code: int | None) -> bool:
    if outcome.kind == "close":
        return code == outcome.value and [m.get("code") for m in messages] == [outcome.error]
    if code is not None:
        return False
    if outcome.kind == "silent":
        return messages == []
    if len(messages) != 1:
        return False
    (message,) = messages
    if outcome.kind == "error":
        return message["type"] == "error" and message["code"] == outcome.value
    if outcome.kind == "refreshed":
        return (
            message.get("type") == "token_refreshed"
            and set(message) == {"type", "expires_at"}
            and message["expires_at"] == outcome.value
        )
    return _canonical(message) == _canonical(outcome.value)


def _timer_close(messages: list[dict[str, Any]], code: int | None) -> bool:
    """A close that a timer or a limit may cause at any moment, announced by its error."""
    return code in TIMER_CLOSES and bool(messages) and messages[-1].get("code") == TIMER_CLOSES[code]


# -- the harness -----------------------------------------------------------------------------


Job = Callable[[], Awaitable[None]]


class Harness:
    """One app, one client, a watcher and a fuzzed connection, for all examples of a test.

    Everything async runs in one task (`_serve`) on a private event loop: httpx-ws's cancel
    scopes must be entered and left in the same task. Each hypothesis example hands its frames
    to that task and waits for the verdict.
    """

    def __init__(self, app: DreamWebSocketApp, caplog: pytest.LogCaptureFixture) -> None:
        self.app = app
        self.caplog = caplog
        self.loop = asyncio.new_event_loop()
        self.latest: dict[str, Any] | None = None
        self.counts: collections.Counter[str] = collections.Counter()
        self.published = 0
        self._queue: asyncio.Queue[tuple[Job, asyncio.Future[None]] | None] | None = None
        self._owner: asyncio.Task[None] | None = None
        self._client: ConsumerTestClient | None = None
        self._watcher: ClientConnection | None = None
        self._fuzzed: ClientConnection | None = None
        self._watcher_stack = contextlib.AsyncExitStack()
        self._fuzzed_stack = contextlib.AsyncExitStack()
        self._log_mark = 0

    # -- sync API for the hypothesis test --------------------------------------------------

    def start(self) -> None:
        self.loop.run_until_complete(self._start())

    def run(self, frames: list[Frame]) -> None:
        """Send `frames` on the fuzzed connection, checking each answer, then publish."""
        self._run(lambda: self._example(frames))

    def handshake(self, origin: str) -> None:
        """Open a connection with this `Origin` header, check the answer, then publish."""
        self._run(lambda: self._handshake(origin))

    def _run(self, job: Job) -> None:
        try:
            self.loop.run_until_complete(self._submit(job))
        except BaseException:
            self._log_mark = len(self.caplog.records)  # the next example starts with a clean slate
            raise
        self.assert_clean_logs()

    def stop(self) -> None:
        try:
            self.loop.run_until_complete(self._stop())
        finally:
            self.loop.close()
        self.assert_clean_logs()

    def assert_clean_logs(self) -> None:
        records = self.caplog.records[self._log_mark :]
        self._log_mark = len(self.caplog.records)
        bad = [
            record
            for record in records
            if record.name.startswith(("starlette_dream_ws", "asyncio"))
            and (record.levelno >= logging.ERROR or record.exc_info or "Traceback" in record.getMessage())
        ]
        assert not bad, "\n".join(f"{r.name} {r.levelname}: {r.getMessage()}" for r in bad)

    # -- the owner task ----------------------------------------------------------------------

    async def _start(self) -> None:
        self._queue = asyncio.Queue()
        ready: asyncio.Future[None] = self.loop.create_future()
        self._owner = self.loop.create_task(self._serve(ready))
        await asyncio.wait({ready, self._owner}, return_when=asyncio.FIRST_COMPLETED)
        if self._owner.done():
            self._owner.result()  # raises what failed
        ready.result()

    async def _submit(self, job: Job) -> None:
        assert self._queue is not None and self._owner is not None
        if self._owner.done():
            self._owner.result()
            raise AssertionError("the harness stopped")
        verdict: asyncio.Future[None] = self.loop.create_future()
        await self._queue.put((job, verdict))
        await asyncio.wait({verdict, self._owner}, return_when=asyncio.FIRST_COMPLETED)
        if not verdict.done():
            self._owner.result()
        verdict.result()

    async def _stop(self) -> None:
        if self._queue is not None and self._owner is not None and not self._owner.done():
            await self._queue.put(None)
        if self._owner is not None:
            await self._owner

    async def _serve(self, ready: asyncio.Future[None]) -> None:
        async with ConsumerTestClient(self.app) as client:
            self._client = client
            try:
                await self._open_connections()
                ready.set_result(None)
                assert self._queue is not None
                while (job := await self._queue.get()) is not None:
                    run_job, verdict = job
                    try:
                        await run_job()
                    except BaseException as exc:
                        # Start the next example (a shrink, say) from fresh connections.
                        errors = await self._close_connections()
                        if isinstance(exc, asyncio.CancelledError):
                            # httpx-ws cancels the task that opened a connection when the
                            # connection's reader fails: the reason comes out on closing it.
                            failure = AssertionError(f"a test connection failed: {errors!r}")
                            failure.__cause__ = errors[0] if errors else exc
                            exc = failure
                        verdict.set_exception(exc)
                        await self._open_connections()
                    else:
                        verdict.set_result(None)
            finally:
                await self._close_connections()

    async def _open_connections(self) -> None:
        assert self._client is not None
        self._watcher = await self._watcher_stack.enter_async_context(
            self._client.connect(f"/dreams/{DREAM}", user=WATCHER)
        )
        await self._greeted(self._watcher)
        await self._reopen_fuzzed()

    async def _close_connections(self) -> list[BaseException]:
        """Close both connections; returns what closing them raised."""
        errors: list[BaseException] = []
        # Reverse order of opening: anyio's cancel scopes must be left last in, first out.
        for stack in (self._fuzzed_stack, self._watcher_stack):
            try:
                await stack.aclose()
            except BaseException as exc:
                errors.append(exc)
        self._fuzzed = self._watcher = None
        return errors

    async def _reopen_fuzzed(self) -> None:
        assert self._client is not None
        if self._fuzzed is not None:
            self._fuzzed = None
            await self._fuzzed_stack.aclose()
        self._fuzzed = await self._fuzzed_stack.enter_async_context(
            self._client.connect(f"/dreams/{DREAM}", user=FUZZ_USER, transport="subprotocol")
        )
        await self._greeted(self._fuzzed)
        self.counts["connections"] += 1

    @staticmethod
    async def _greeted(ws: ClientConnection) -> None:
        greeting = await ws.receive_json(timeout=TIMEOUT)
        assert greeting["type"] == "connection_established", greeting
        assert greeting["dream_id"] == DREAM, greeting

    async def _example(self, frames: list[Frame]) -> None:
        self.counts["examples"] += 1
        for frame in frames:
            await self._frame(frame)
        await self._publish_and_check()

    async def _frame(self, frame: Frame) -> None:
        outcomes, bug = expected(frame, self.latest)
        if bug is not None:
            self.counts[f"skipped (known bug: {bug})"] += 1
            return
        ws = self._fuzzed
        assert ws is not None
        self.counts["frames"] += 1
        self.counts["cases"] += 1
        probe = f"probe-{self.counts['frames']}"
        if isinstance(frame.payload, bytes):
            await ws.send_bytes(frame.payload)
        else:
            await ws.send_text(frame.payload)
        # Pipelined: the probe's pong ends the answer to the frame (unless the server closed).
        with contextlib.suppress(WebSocketDisconnect, WebSocketNetworkError):
            await ws.send_json({"type": "ping", "timestamp": probe})
        messages, code = await self._collect(ws, probe)
        for message in messages:
            _check_message(message)
        assert code is None or code in DOCUMENTED_CLOSES, (frame, code, messages)
        if any(_matches(outcome, messages, code) for outcome in outcomes):
            self.counts["close" if code is not None else "answered"] += 1
        elif _timer_close(messages, code):
            self.counts[f"closed by a timer or limit ({code})"] += 1
        else:
            raise AssertionError(f"{frame!r}: expected one of {outcomes}, got {messages} and close {code}")
        if code is not None:
            await self._reopen_fuzzed()

    @staticmethod
    async def _collect(ws: ClientConnection, probe: str) -> tuple[list[dict[str, Any]], int | None]:
        """Messages up to the probe's pong (server pings skipped), or up to the close."""
        messages: list[dict[str, Any]] = []
        while True:
            try:
                text = await ws.session.receive_text(timeout=TIMEOUT)
            except WebSocketDisconnect as exc:
                return messages, exc.code
            message = json.loads(text, parse_constant=_no_constants)
            if isinstance(message, dict) and message.get("type") == "ping" and set(message) == {"type", "timestamp"}:
                continue  # the server's heartbeat
            if message == {"type": "pong", "timestamp": probe}:
                return messages, None
            messages.append(message)

    async def _handshake(self, origin: str) -> None:
        assert self._client is not None
        self.counts["examples"] += 1
        self.counts["handshakes"] += 1
        self.counts["cases"] += 1
        allowed, bug = origin_expected(origin)
        if bug is not None:
            self.counts[f"skipped (known bug: {bug})"] += 1
            return
        async with self._client.connect(f"/dreams/{DREAM}", user="visitor", headers={"Origin": origin}) as ws:
            try:
                first = await ws.receive_json(timeout=TIMEOUT)
            except WebSocketDisconnect as exc:
                raise AssertionError(f"Origin {origin!r}: closed with {exc.code} before any message") from None
            _check_message(first)
            if first["type"] == "connection_established":
                assert allowed is not False, f"Origin {origin!r} of another site was let in"
                self.counts["origin allowed"] += 1
            else:
                assert allowed is not True, f"Origin {origin!r}: refused with {first}"
                assert first.get("code") == "origin_not_allowed", (origin, first)
                code, rest = await ws.expect_close(timeout=TIMEOUT)
                assert (code, rest) == (1008, []), (origin, code, rest)
                self.counts["origin refused"] += 1
        await self._publish_and_check()

    async def _publish_and_check(self) -> None:
        """The watcher (and the fuzzed connection) still get every update of the dream."""
        self.published += 1
        images = [f"https://cdn.example/{DREAM}/{self.published}.png"]
        note = f"update {self.published}"
        await asend_image_update(DREAM, images, "processing", note)
        for ws in (self._watcher, self._fuzzed):
            assert ws is not None
            while True:
                update = await ws.receive_json(timeout=TIMEOUT)
                if update["type"] != "ping":
                    break
            assert update["type"] == "image_update", update
            assert (update["dream_id"], update["images"], update["message"]) == (DREAM, images, note), update
        self.latest = update


@pytest.fixture
def harness(make_app: MakeApp, caplog: pytest.LogCaptureFixture, request: pytest.FixtureRequest) -> Iterator[Harness]:
    caplog.set_level(logging.DEBUG, logger="starlette_dream_ws")
    app = make_app(
        max_message_size=LIMIT,
        # The fuzzing is about what frames say, not how fast they come: test_limits.py has the rate.
        max_messages_per_second=1_000_000.0,
        message_burst=1_000_000,
    )
    fuzz = Harness(app, caplog)
    started = time.monotonic()
    fuzz.start()
    try:
        yield fuzz
    finally:
        fuzz.stop()
        elapsed = time.monotonic() - started
        FUZZ_COUNTS.update(fuzz.counts)
        FUZZ_COUNTS["seconds"] += round(elapsed, 2)
        request.node.user_properties.append(("fuzz_cases", fuzz.counts["cases"]))
        request.node.user_properties.append(("fuzz_counts", dict(fuzz.counts)))
        print(f"\n{request.node.name}: {fuzz.counts['cases']} cases in {elapsed:.1f} s: {dict(fuzz.counts)}")


@pytest.fixture(scope="module", autouse=True)
def report_fuzz_counts(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if not FUZZ_COUNTS:
        return
    line = (
        f"fuzz: {FUZZ_COUNTS['cases']} cases ({FUZZ_COUNTS['frames']} frames, {FUZZ_COUNTS['handshakes']} handshakes) "
        f"in {FUZZ_COUNTS['examples']} examples ({EXAMPLES} per test, DREAM_WS_FUZZ_EXAMPLES), "
        f"{FUZZ_COUNTS['seconds']:.1f} s; "
        + ", ".join(
            f"{key}: {value}"
            for key, value in sorted(FUZZ_COUNTS.items())
            if key not in ("cases", "frames", "handshakes", "examples", "seconds")
        )
    )
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
        print("\n" + line)


# -- the fuzz tests --------------------------------------------------------------------------


@FUZZ_SETTINGS
@given(frames=st.lists(binary_frames, min_size=1, max_size=4))
def test_binary_frames(harness: Harness, frames: list[Frame]) -> None:
    harness.run(frames)


@FUZZ_SETTINGS
@given(frames=st.lists(text_frames, min_size=1, max_size=4))
def test_text_frames(harness: Harness, frames: list[Frame]) -> None:
    harness.run(frames)


@FUZZ_SETTINGS
@given(frames=st.lists(json_frames, min_size=1, max_size=4))
def test_json_values_of_every_shape(harness: Harness, frames: list[Frame]) -> None:
    harness.run(frames)


@FUZZ_SETTINGS
@given(frames=st.lists(type_frames, min_size=1, max_size=6))
def test_types_of_every_kind_and_handler_names(harness: Harness, frames: list[Frame]) -> None:
    harness.run(frames)


@FUZZ_SETTINGS
@given(frames=st.lists(request_status_frames, min_size=1, max_size=4))
def test_request_status_with_any_dream_id(harness: Harness, frames: list[Frame]) -> None:
    harness.run(frames)


@FUZZ_SETTINGS
@given(frames=st.lists(ping_frames, min_size=1, max_size=6))
def test_ping_echoes_any_timestamp_exactly(harness: Harness, frames: list[Frame]) -> None:
    harness.run(frames)


@FUZZ_SETTINGS
@given(frames=st.lists(refresh_frames, min_size=1, max_size=3))
def test_refresh_token_with_any_token(harness: Harness, frames: list[Frame]) -> None:
    harness.run(frames)


@FUZZ_SETTINGS
@given(frames=st.lists(all_frames, min_size=1, max_size=8))
def test_any_sequence_of_frames(harness: Harness, frames: list[Frame]) -> None:
    harness.run(frames)


@FUZZ_SETTINGS
@given(origin=origins)
def test_origin_header_at_the_handshake(harness: Harness, origin: str) -> None:
    harness.handshake(origin)


# -- helpers for the tests of the bugs the fuzzing found ------------------------------------


async def _greeted(ws: ClientConnection) -> None:
    assert (await ws.receive_json())["type"] == "connection_established"


async def _still_open(ws: ClientConnection) -> None:
    await ws.send_json({"type": "ping", "timestamp": "check"})
    assert await ws.receive_json() == {"type": "pong", "timestamp": "check"}


def _errors_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        f"{r.name} {r.levelname}: {r.getMessage()}"
        for r in caplog.records
        if r.name.startswith("starlette_dream_ws") and (r.levelno >= logging.ERROR or r.exc_info)
    ]


# -- bugs the fuzzing found that are fixed (36587c4): regression tests ----------------------


@pytest.mark.anyio
async def test_a_deeply_nested_timestamp_is_echoed_or_refused(
    make_app: MakeApp, caplog: pytest.LogCaptureFixture
) -> None:
    # Was: nested just below the depth json.loads accepts, the pong could not be encoded
    # (RecursionError): internal_error and a logged traceback.
    caplog.set_level(logging.DEBUG, logger="starlette_dream_ws")
    app = make_app(max_message_size=LIMIT, max_messages_per_second=1_000_000.0, message_burst=1_000_000)
    answers: dict[int, str] = {}
    async with ConsumerTestClient(app) as client, client.connect("/dreams/1") as ws:
        await _greeted(ws)
        # Where the window lies depends on the stack below the connection's task: try them all.
        for depth in range(LENIENT_DEPTH, (LIMIT - 40) // 2):
            await ws.send_text('{"type":"ping","timestamp":' + "[" * depth + "]" * depth + "}")
            answer = await ws.receive_json()
            answers[depth] = answer["type"] if answer["type"] == "pong" else answer["code"]
        await _still_open(ws)
    allowed = ("pong", "invalid_json", "invalid_message")
    wrong = {depth: answer for depth, answer in answers.items() if answer not in allowed}
    assert not wrong, f"answers other than {allowed} at depths {sorted(wrong)}: {set(wrong.values())}"
    assert not _errors_logged(caplog)


@pytest.mark.anyio
@pytest.mark.parametrize("number", ["1e400", "-1e400", "NaN", "Infinity", "[1, -Infinity]"])
async def test_non_finite_numbers_are_never_sent_back_as_non_json(make_app: MakeApp, number: str) -> None:
    # Was: json.loads takes 1e400/NaN/Infinity and the pong echoed Infinity/NaN, which is not
    # JSON: a browser's JSON.parse throws on the frame.
    async with ConsumerTestClient(make_app()) as client, client.connect("/dreams/1") as ws:
        await _greeted(ws)
        await ws.send_text('{"type":"ping","timestamp":' + number + "}")
        text = await ws.session.receive_text(timeout=TIMEOUT)
        await _still_open(ws)
    answer = json.loads(text, parse_constant=_no_constants)  # strict JSON, as in a browser
    assert (answer["type"], answer["code"]) == ("error", "invalid_message")


async def _serve_raw(app: DreamWebSocketApp, frames: list[str], wait: float) -> list[dict[str, Any]]:
    """Run one connection through the raw ASGI interface, with a `send` that encodes text
    frames as strict UTF-8 the way uvicorn's WebSocket implementations do; returns what was
    sent within `wait` seconds of the last frame."""
    token = jwt.encode({"sub": "u1", "exp": _exp(3600)}, SECRET, algorithm="HS256")
    incoming: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    sent: list[dict[str, Any]] = []
    scope = {
        "type": "websocket",
        "asgi": {"version": "3.0"},
        "scheme": "ws",
        "http_version": "1.1",
        "path": "/dreams/1",
        "raw_path": b"/dreams/1",
        "root_path": "",
        "query_string": f"token={token}".encode(),
        "headers": [(b"host", b"testserver")],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
        "subprotocols": [],
    }

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "websocket.send" and message.get("text") is not None:
            message["text"].encode("utf-8")  # UnicodeEncodeError, as in websockets and wsproto
        sent.append(message)

    async with app.lifespan():
        task = asyncio.create_task(app(scope, incoming.get, send))
        await incoming.put({"type": "websocket.connect"})
        for frame in frames:
            await incoming.put({"type": "websocket.receive", "text": frame})
        await asyncio.sleep(wait)
        await incoming.put({"type": "websocket.disconnect", "code": 1000})
        await asyncio.wait_for(task, TIMEOUT)
    return sent


@pytest.mark.anyio
@pytest.mark.parametrize("stamp", ['"\\ud800"', '{"\\udfff": 1}', '["ok", "\\udc00"]'])
async def test_a_lone_surrogate_in_a_timestamp_does_not_silence_the_connection(make_app: MakeApp, stamp: str) -> None:
    # Was: the JSON-escaped lone surrogate was echoed into a text frame a real server cannot
    # encode; the failed send marked the connection closed without closing it, so it never
    # answered again, not even with the heartbeat's 4408: a zombie connection.
    frames = ['{"type":"ping","timestamp":' + stamp + "}", '{"type":"ping","timestamp":"after"}']
    sent = await _serve_raw(make_app(), frames, wait=0.2)
    texts = [json.loads(m["text"]) for m in sent if m["type"] == "websocket.send"]
    assert [m["type"] for m in texts] == ["connection_established", "error", "pong"], texts
    assert texts[1]["code"] == "invalid_message"
    assert texts[2] == {"type": "pong", "timestamp": "after"}


# -- regressions of package bugs the fuzzing found ------------------------------------------


@pytest.mark.anyio
async def test_type_json_is_an_unknown_type(make_app: MakeApp, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="starlette_dream_ws")
    async with ConsumerTestClient(make_app()) as client, client.connect("/dreams/1") as ws:
        await _greeted(ws)
        await ws.send_json({"type": "json"})
        answer = await ws.receive_json()
        await _still_open(ws)
    assert (answer["type"], answer["code"]) == ("error", "unknown_type")
    assert not _errors_logged(caplog)


@pytest.mark.anyio
@pytest.mark.parametrize("origin", ["http://[::1", "http://[", "https://]x"])
async def test_a_malformed_origin_is_refused_with_1008(
    make_app: MakeApp, caplog: pytest.LogCaptureFixture, origin: str
) -> None:
    caplog.set_level(logging.DEBUG, logger="starlette_dream_ws")
    async with ConsumerTestClient(make_app()) as client:
        async with client.connect("/dreams/1", headers={"Origin": origin}) as ws:
            code, messages = await ws.expect_close()
    assert (code, [m.get("code") for m in messages]) == (1008, ["origin_not_allowed"])
    assert not _errors_logged(caplog)
