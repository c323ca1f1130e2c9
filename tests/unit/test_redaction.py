"""Tokens in query strings are redacted from uvicorn's handshake log lines."""

from __future__ import annotations

import logging

import pytest

from starlette_dream_ws.server import redaction

TOKEN = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ1MSJ9.c2lnbmF0dXJl"


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (f"/ws/dreams/1?token={TOKEN}", "/ws/dreams/1?token=[redacted]"),
        (f"/ws/dreams/1?a=1&token={TOKEN}&b=2", "/ws/dreams/1?a=1&token=[redacted]&b=2"),
        (f"/ws/dreams/1?access_token={TOKEN}", "/ws/dreams/1?access_token=[redacted]"),
        ("/ws/dreams/1?mytoken=keep", "/ws/dreams/1?mytoken=keep"),
        ("/ws/dreams/1", "/ws/dreams/1"),
    ],
)
def test_redact(path: str, expected: str) -> None:
    assert redaction.redact(path) == expected


def test_installed_filter_redacts_uvicorn_handshake_lines(caplog: pytest.LogCaptureFixture) -> None:
    redaction.install()
    redaction.install()  # idempotent
    logger = logging.getLogger("uvicorn.error")
    assert sum(isinstance(f, redaction.RedactTokens) for f in logger.filters) == 1
    with caplog.at_level(logging.INFO, logger="uvicorn.error"):
        # The exact call uvicorn makes when it accepts a WebSocket.
        logger.info('%s - "WebSocket %s" [accepted]', "127.0.0.1:5000", f"/ws/dreams/1?token={TOKEN}")
    assert TOKEN not in caplog.text
    assert '"WebSocket /ws/dreams/1?token=[redacted]" [accepted]' in caplog.text
