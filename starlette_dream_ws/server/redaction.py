"""Keep tokens out of server logs.

uvicorn logs each WebSocket handshake with its path and query string
(`"WebSocket /ws/dreams/1?token=eyJ..." [accepted]`), so a token sent in the query
string would reach the logs. The app installs this filter on uvicorn's loggers when it
starts; it rewrites the record's arguments, never the token-free rest of the line.
"""

from __future__ import annotations

import logging
import re

TOKEN_IN_QUERY = re.compile(r"(?i)((?:^|[?&;])(?:access_)?token=)[^&;\s\"']+")
REDACTED = r"\1[redacted]"

#: uvicorn's loggers that print request paths.
UVICORN_LOGGERS = ("uvicorn.error", "uvicorn.access")


def redact(text: str) -> str:
    return TOKEN_IN_QUERY.sub(REDACTED, text)


class RedactTokens(logging.Filter):
    """Replaces `token=<value>` in a record's message and string arguments."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and "token=" in record.msg.lower():
            record.msg = redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(redact(arg) if isinstance(arg, str) else arg for arg in record.args)
        return True


def install(logger_names: tuple[str, ...] = UVICORN_LOGGERS) -> None:
    """Add the filter to these loggers once (idempotent)."""
    for name in logger_names:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactTokens) for f in logger.filters):
            logger.addFilter(RedactTokens())
