"""Structured log events of connections: one line each, never with a token.

As text (`event key=value ...`) through whatever logging configuration the application has,
or, with `log_format="json"`, as one JSON object per line (`JsonFormatter`).
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import Any, TextIO

from starlette.types import Scope

from ..settings import Settings
from .redaction import redact

logger = logging.getLogger("starlette_dream_ws.consumer")

#: The logger every logger of the component is a child of.
PACKAGE_LOGGER = "starlette_dream_ws"
#: The keys of every JSON line; fields of an event with one of these names do not replace it.
JSON_KEYS = ("time", "level", "logger", "event", "message")


def log_event(scope: Scope, user_id: str | None, event: str, level: int = logging.INFO, **fields: Any) -> None:
    """`event key=value ...`, the fields also in `record.dream_ws` for JSON log handlers.

    Paths come without their query string (where a token may be), users by id.
    """
    if not logger.isEnabledFor(level):
        return
    fields = {"path": scope.get("path"), **fields}
    if user_id is not None:
        fields.setdefault("user", user_id)
    text = " ".join(f"{key}={value}" for key, value in fields.items())
    logger.log(level, "%s %s", event, text, extra={"dream_ws": {"event": event, **fields}})


class JsonFormatter(logging.Formatter):
    """One JSON object per record: `time`, `level`, `logger`, `event`, the event's fields
    (`record.dream_ws`), `message`, and `exc_info` as text when there is an exception.

    Usable on any handler, such as in a `logging.config` dictionary (uvicorn `--log-config`)::

        "formatters": {"json": {"()": "starlette_dream_ws.server.logs.JsonFormatter"}}
    """

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "dream_ws", None)
        fields = dict(fields) if isinstance(fields, dict) else {}
        line: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "event": fields.pop("event", None),
        }
        line.update((key, value) for key, value in fields.items() if key not in JSON_KEYS)
        # Redacted again: this formatter may sit on loggers without the `RedactTokens` filter
        # (an application's own, or uvicorn's before the app has been constructed).
        line["message"] = redact(record.getMessage())
        if record.exc_info:
            record.exc_text = record.exc_text or self.formatException(record.exc_info)
        if record.exc_text:
            line["exc_info"] = redact(record.exc_text)
        if record.stack_info:
            line["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(line, default=str, ensure_ascii=False)


class _JsonHandler(logging.StreamHandler[TextIO]):
    """The handler `configure_logging` adds; its class tells that it is there already."""


def configure_logging(settings: Settings) -> None:
    """With `log_format="json"`, write the component's log lines as JSON to stderr.

    Idempotent (one handler, however many apps are constructed). The root logger is left
    alone; the component's lines stop propagating to it, or an application that logs to the
    console would print each of them twice, once as text. The `starlette_dream_ws` logger is
    set to INFO unless the application gave it a level: connection events are INFO.
    With `text`, nothing is changed: the application's logging configuration rules.
    """
    if settings.log_format != "json":
        return
    package = logging.getLogger(PACKAGE_LOGGER)
    if any(isinstance(handler, _JsonHandler) for handler in package.handlers):
        return
    handler = _JsonHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    package.addHandler(handler)
    package.propagate = False
    if package.level == logging.NOTSET:
        package.setLevel(logging.INFO)
