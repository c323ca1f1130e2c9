"""Tokens are redacted from the records uvicorn and websockets log, in every shape they log them.

The shapes are the real ones (see `redaction`'s docstring): a query string in the access and
handshake lines, `"< %s: %s"` header lines (str, and bytes for other servers), objects rendered
by `%s`/`%r` (header pairs, `Headers`, a scope dict at TRACE, a frame), and exception text. The
filter must also leave token-free records exactly as they were, and never drop one.
"""

from __future__ import annotations

import asyncio
import logging
import logging.config
from typing import Any

import pytest
from uvicorn.logging import TRACE_LOG_LEVEL, AccessFormatter
from uvicorn.middleware.message_logger import MessageLoggerMiddleware
from websockets.datastructures import Headers
from websockets.frames import Frame, Opcode
from websockets.server import ServerProtocol

from starlette_dream_ws.server import redaction

TOKEN = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ1MSJ9.c2lnbmF0dXJl"
#: What no line may hold: the token's claims and its signature.
SECRETS = ("eyJzdWIiOiJ1MSJ9", "c2lnbmF0dXJl")


def assert_clean(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, text


@pytest.fixture
def installed() -> None:
    redaction.install()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"/ws/dreams/1?token={TOKEN}", "/ws/dreams/1?token=[redacted]"),
        (f"/ws/dreams/1?a=1&token={TOKEN}&b=2", "/ws/dreams/1?a=1&token=[redacted]&b=2"),
        (f"/ws/dreams/1?access_token={TOKEN}", "/ws/dreams/1?access_token=[redacted]"),
        ("/ws/dreams/1?mytoken=keep", "/ws/dreams/1?mytoken=keep"),
        ("/ws/dreams/1", "/ws/dreams/1"),
        # A header line, as websockets logs it and as `str(Headers)` prints it.
        (f"< authorization: Bearer {TOKEN}", "< authorization: Bearer [redacted]"),
        ("Authorization: Basic dXNlcjpwYXNz\r\nHost: a\r\n", "Authorization: Basic [redacted]\r\nHost: a\r\n"),
        (f"Proxy-Authorization: {TOKEN}", "Proxy-Authorization: [redacted]"),
        # Reprs of header pairs, `Headers` and dicts: the value ends at its closing quote.
        (
            f"[(b'authorization', b'Bearer {TOKEN}'), (b'host', b'a')]",
            "[(b'authorization', b'Bearer [redacted]'), (b'host', b'a')]",
        ),
        (f"Headers([('Authorization', 'Bearer {TOKEN}')])", "Headers([('Authorization', 'Bearer [redacted]')])"),
        ("""{'authorization': 'Digest user="a", response="b"'}""", "{'authorization': 'Digest [redacted]'}"),
        (f'{{"Authorization": "Bearer {TOKEN}"}}', '{"Authorization": "Bearer [redacted]"}'),
        # The subprotocol, alone or in the header's list, or in a scope's list.
        (f"dream-ws.v1, dream-ws.bearer.{TOKEN}", "dream-ws.v1, dream-ws.bearer.[redacted]"),
        (f"['dream-ws.v1', 'dream-ws.bearer.{TOKEN}']", "['dream-ws.v1', 'dream-ws.bearer.[redacted]']"),
        (f"'query_string': b'token={TOKEN}'", "'query_string': b'token=[redacted]'"),
        # A bearer token without its header name, and a `refresh_token` message (elided by websockets).
        (f"Bearer {TOKEN}", "Bearer [redacted]"),
        (
            f"""TEXT '{{"type":"refresh_token","token":"{TOKEN[:20]}...{TOKEN[-9:]}"}}'""",
            """TEXT '{"type":"refresh_token","token":"[redacted]"}'""",
        ),
        # Prose stays as it is.
        ("no bearer token was given", "no bearer token was given"),
        ("Authorization failed: expired", "Authorization failed: expired"),
        ('{"type":"token_refreshed","expires_at":1.0}', '{"type":"token_refreshed","expires_at":1.0}'),
    ],
)
def test_redact(text: str, expected: str) -> None:
    assert redaction.redact(text) == expected
    assert redaction.redact(expected) == expected  # applying it twice changes nothing more


def test_install_is_idempotent_and_touches_nothing_but_filters() -> None:
    loggers = [logging.getLogger(name) for name in redaction.UVICORN_LOGGERS]
    before = [(logger.level, list(logger.handlers), logger.propagate, logger.disabled) for logger in loggers]
    redaction.install()
    redaction.install()
    for logger, state in zip(loggers, before, strict=True):
        assert sum(isinstance(f, redaction.RedactTokens) for f in logger.filters) == 1
        assert (logger.level, list(logger.handlers), logger.propagate, logger.disabled) == state


def test_a_logging_config_applied_later_keeps_the_filter() -> None:
    # The app may be built before the server configures logging (`uvicorn.run(app)`).
    name = "test_redaction.configured_later"
    redaction.install((name,))
    logging.config.dictConfig({"version": 1, "disable_existing_loggers": False, "loggers": {name: {"level": "DEBUG"}}})
    assert any(isinstance(f, redaction.RedactTokens) for f in logging.getLogger(name).filters)


@pytest.mark.usefixtures("installed")
def test_uvicorn_handshake_line(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("uvicorn.error")
    with caplog.at_level(logging.INFO, logger="uvicorn.error"):
        # The exact call uvicorn makes when it accepts a WebSocket.
        logger.info('%s - "WebSocket %s" [accepted]', "127.0.0.1:5000", f"/ws/dreams/1?token={TOKEN}")
    assert_clean(caplog.text)
    assert '"WebSocket /ws/dreams/1?token=[redacted]" [accepted]' in caplog.text


@pytest.mark.usefixtures("installed")
def test_access_line_keeps_its_arguments_for_uvicorns_formatter(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("uvicorn.access")
    with caplog.at_level(logging.INFO, logger="uvicorn.access"):
        logger.info('%s - "%s %s HTTP/%s" %d', "127.0.0.1:5000", "GET", f"/dreams/1/events?token={TOKEN}", "1.1", 200)
    (record,) = caplog.records
    # uvicorn's AccessFormatter unpacks exactly five arguments.
    line = AccessFormatter(fmt="%(client_addr)s %(request_line)s %(status_code)s", use_colors=False).format(record)
    assert line == "127.0.0.1:5000 GET /dreams/1/events?token=[redacted] HTTP/1.1 200 OK"


@pytest.mark.usefixtures("installed")
@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("authorization", f"Bearer {TOKEN}", "< authorization: Bearer [redacted]"),
        ("Authorization", "Basic dXNlcjpwYXNzd29yZA==", "< Authorization: Basic [redacted]"),
        ("Proxy-Authorization", "Negotiate YIIBhgYGKwYBBQUCoIIBejCC", "< Proxy-Authorization: Negotiate [redacted]"),
        (
            "sec-websocket-protocol",
            f"dream-ws.v1, dream-ws.bearer.{TOKEN}",
            "< sec-websocket-protocol: dream-ws.v1, dream-ws.bearer.[redacted]",
        ),
        (b"authorization", f"Bearer {TOKEN}".encode(), "< b'authorization': b'Bearer [redacted]'"),
        # The session cookie of an app that authenticates connections with its own session.
        ("cookie", f"session={TOKEN}; theme=dark", "< cookie: [redacted]"),
    ],
)
def test_header_line_arguments(
    caplog: pytest.LogCaptureFixture, name: str | bytes, value: str | bytes, expected: str
) -> None:
    logger = logging.getLogger("uvicorn.error")
    with caplog.at_level(logging.DEBUG, logger="uvicorn.error"):
        logger.debug("< %s: %s", name, value)
    assert_clean(caplog.text)
    (record,) = caplog.records
    assert record.getMessage() == expected
    # Redacted in place: the same two arguments, of the same types.
    assert isinstance(record.args, tuple) and [type(arg) for arg in record.args] == [type(name), type(value)]


@pytest.mark.usefixtures("installed")
@pytest.mark.parametrize(
    ("msg", "arg", "expected"),
    [
        (
            "headers %r",
            [(b"host", b"a"), (b"authorization", f"Bearer {TOKEN}".encode())],
            "headers [(b'host', b'a'), (b'authorization', b'Bearer [redacted]')]",
        ),
        ("headers %s", (("Authorization", f"Bearer {TOKEN}"),), "headers (('Authorization', 'Bearer [redacted]'),)"),
        (
            "headers %r",
            Headers([("Authorization", f"Bearer {TOKEN}")]),
            "headers Headers([('Authorization', 'Bearer [redacted]')])",
        ),
        (
            "headers %r",
            [(b"host", b"a"), (b"cookie", f"session={TOKEN}".encode())],
            "headers [(b'host', b'a'), (b'cookie', b'[redacted]')]",
        ),
        (
            "headers:\n%s",
            Headers([("Authorization", f"Bearer {TOKEN}"), ("Host", "a")]),
            "headers:\nAuthorization: Bearer [redacted]\r\nHost: a\r\n\r\n",
        ),
        ("< %s", Frame(Opcode.TEXT, f'{{"type":"refresh_token","token":"{TOKEN}"}}'.encode()), None),
    ],
)
def test_object_arguments_are_redacted_as_rendered(
    caplog: pytest.LogCaptureFixture, msg: str, arg: Any, expected: str | None
) -> None:
    logger = logging.getLogger("uvicorn.error")
    with caplog.at_level(logging.DEBUG, logger="uvicorn.error"):
        logger.debug(msg, arg)
    assert_clean(caplog.text)
    message = caplog.records[0].getMessage()
    if expected is None:
        assert message.startswith("""< TEXT '{"type":"refresh_token","token":"[redacted]"}'""")
    else:
        assert message == expected


@pytest.mark.usefixtures("installed")
def test_records_without_a_token_are_left_as_they_were(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("uvicorn.error")
    frame = Frame(Opcode.TEXT, b'{"type":"token_refreshed","expires_at":1.0}')
    args: list[tuple[object, ...]] = [("host", "example.org"), (frame,), ("127.0.0.1:5000", "/ws/dreams/1", 403)]
    with caplog.at_level(logging.DEBUG, logger="uvicorn.error"):
        logger.debug("< %s: %s", *args[0])
        logger.debug("> %s", *args[1])
        logger.info('%s - "WebSocket %s" %d', *args[2])
    assert [record.args for record in caplog.records] == args
    frame_args = caplog.records[1].args
    assert isinstance(frame_args, tuple) and frame_args[0] is frame  # the object itself, not its rendering
    assert [record.msg for record in caplog.records] == ["< %s: %s", "> %s", '%s - "WebSocket %s" %d']


@pytest.mark.usefixtures("installed")
def test_exception_text(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("uvicorn.error")
    with caplog.at_level(logging.ERROR, logger="uvicorn.error"):
        try:
            raise ValueError(f"bad header: Authorization: Bearer {TOKEN}")
        except ValueError:
            logger.exception("Exception in ASGI application\n")
    assert_clean(caplog.text)
    assert "ValueError: bad header: Authorization: Bearer [redacted]" in caplog.text


@pytest.mark.usefixtures("installed")
def test_websockets_handshake_as_uvicorn_runs_it(caplog: pytest.LogCaptureFixture) -> None:
    """websockets' sans-I/O server, given uvicorn's logger, logs each request header at DEBUG."""
    request = (
        f"GET /ws/dreams/1?token={TOKEN} HTTP/1.1\r\n"
        "Host: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        f"Authorization: Bearer {TOKEN}\r\n"
        f"Sec-WebSocket-Protocol: dream-ws.v1, dream-ws.bearer.{TOKEN}\r\n\r\n"
    )
    with caplog.at_level(logging.DEBUG, logger="uvicorn.error"):
        protocol = ServerProtocol(logger=logging.getLogger("uvicorn.error"))
        protocol.receive_data(request.encode())
        assert protocol.events_received()
    assert_clean(caplog.text)
    lines = [record.getMessage() for record in caplog.records]
    assert "< GET /ws/dreams/1?token=[redacted] HTTP/1.1" in lines
    assert "< Authorization: Bearer [redacted]" in lines
    assert "< Sec-WebSocket-Protocol: dream-ws.v1, dream-ws.bearer.[redacted]" in lines


@pytest.mark.usefixtures("installed")
def test_websockets_legacy_logger_adapter(caplog: pytest.LogCaptureFixture) -> None:
    # The legacy protocol (`--ws websockets`) logs the same lines through a LoggerAdapter.
    adapter = logging.LoggerAdapter(logging.getLogger("uvicorn.error"), {"websocket": None})
    with caplog.at_level(logging.DEBUG, logger="uvicorn.error"):
        adapter.debug("< GET %s HTTP/1.1", f"/ws/dreams/1?token={TOKEN}")
        adapter.debug("< %s: %s", "authorization", f"Bearer {TOKEN}")
    assert_clean(caplog.text)
    assert "< authorization: Bearer [redacted]" in caplog.text


@pytest.mark.usefixtures("installed")
def test_uvicorn_trace_scope(caplog: pytest.LogCaptureFixture) -> None:
    """At TRACE, uvicorn's message logger prints each scope: its query string and subprotocols."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        pass

    scope = {
        "type": "websocket",
        "path": "/ws/dreams/1",
        "query_string": f"token={TOKEN}".encode(),
        "headers": [(b"authorization", f"Bearer {TOKEN}".encode())],
        "subprotocols": ["dream-ws.v1", f"dream-ws.bearer.{TOKEN}"],
        "client": ("127.0.0.1", 5000),
    }
    with caplog.at_level(TRACE_LOG_LEVEL, logger="uvicorn.asgi"):
        asyncio.run(MessageLoggerMiddleware(app)(scope, None, None))  # type: ignore[arg-type]
    assert_clean(caplog.text)
    started = caplog.records[0].getMessage()
    assert "'query_string': b'token=[redacted]'" in started
    assert "'subprotocols': ['dream-ws.v1', 'dream-ws.bearer.[redacted]']" in started
