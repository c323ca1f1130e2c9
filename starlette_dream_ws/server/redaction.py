"""Keep tokens out of server logs, at every log level.

Where uvicorn (0.55, with websockets 17) prints a token, all on loggers it creates records on:

- INFO and every lower level, every `--ws` and `--http`: `uvicorn.access` and `uvicorn.error`
  print the path with its query string (`"WebSocket /ws/dreams/1?token=eyJ..." [accepted]`).
- DEBUG, `--ws websockets-sansio` and `--ws websockets`: websockets' handshake code logs the
  request line and each header on the logger uvicorn hands it, `uvicorn.error`
  (`"< %s: %s", "authorization", "Bearer eyJ..."`, and `sec-websocket-protocol` with
  `dream-ws.bearer.eyJ...`), and each frame, its start and its end
  (`"< %s", Frame` printing `TEXT '{"type":"refresh_token","token":"eyJ...' [...]`).
- TRACE, every `--ws` and `--http`: `uvicorn.asgi` prints each scope (a dict holding
  `'query_string': b'token=...'` and `'subprotocols': [..., 'dream-ws.bearer.eyJ...']`;
  uvicorn elides its headers).

`--ws wsproto`, h11 and httptools log no request headers. The filter rewrites only what holds a
token: a string or bytes argument in place (so formatters that read `record.args`, such as
uvicorn's access formatter, still work), or, when an argument is an object (a scope, a frame,
headers), the whole message rendered once; exception text is redacted into `exc_text`. It runs
on every record of these loggers, so a token-free record with plain arguments costs a lowercase
copy of each string and three `in` tests; the regexes run only where `token`, `authorization` or
`bearer` is.
"""

from __future__ import annotations

import logging
import re

from ..protocol import TOKEN_SUBPROTOCOL_PREFIX

#: `token=<jwt>` and `access_token=<jwt>` in a query string, also inside a repr (`b'token=...'`).
TOKEN_IN_QUERY = re.compile(r"(?i)((?<![\w-])(?:access_)?token=)[^&;\s\"']+")
REDACTED = r"\1[redacted]"

#: A token offered as a subprotocol; the prefix stays so the line still says what it was.
TOKEN_SUBPROTOCOL = re.compile(rf"(?i)({re.escape(TOKEN_SUBPROTOCOL_PREFIX)})[^\s,;'\"\[\])}}]+")

#: An Authorization (or Proxy-Authorization) header and its value: quoted, as in a repr of
#: header pairs or a dict (`'authorization', 'Bearer x'`, `b'authorization', b'Bearer x'`), or
#: bare to the end of the line, as in a header line (`Authorization: Bearer x`).
AUTHORIZATION = re.compile(
    r"""(?ix)
    (?P<head>authorization
        (?: ['"] \s* [:,=] \s* b? (?P<quote>['"])
          | [ \t]* [:=] [ \t]*
        )
    )
    (?P<value>(?(quote)(?:(?!(?P=quote)).)*|[^\r\n]*))
    """
)

#: A bearer token without its header name (a header's value logged on its own); 8 characters
#: at least, so prose such as "no bearer token" is left alone.
BEARER = re.compile(r"(?i)\b(bearer[ \t]+)[\w.~+/-]{8,}=*")

#: A token in JSON or a repr of a dict: `"token": "..."` (the `refresh_token` message).
TOKEN_FIELD = re.compile(r"""(?i)((['"])(?:access_|refresh_|id_)?token\2\s*:\s*b?(['"]))(?:(?!\3).)*""")

#: A Cookie header and its value, quoted (a repr of header pairs) or to the end of the line.
COOKIE = re.compile(r"""(?i)(\bcookie(?:['"]\s*[:,=]\s*b?['"]|[ \t]*[:=][ \t]*))[^'"\r\n]+""")

#: Header names whose value is a credential, when a header is logged as `name, value` arguments
#: (cookies: an app that authenticates with its own session is handed its cookie in them).
CREDENTIAL_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie"})

#: uvicorn's loggers that print requests. uvicorn gives websockets' protocols `uvicorn.error`,
#: so websockets' own loggers (`websockets.server`, ...) never see these records.
UVICORN_LOGGERS = ("uvicorn.error", "uvicorn.access", "uvicorn.asgi")

_exception_formatter = logging.Formatter()


def _suspect(text: str) -> bool:
    """Whether `text` may hold a token: cheap, before any regex."""
    lowered = text.lower()
    return "token" in lowered or "authorization" in lowered or "bearer" in lowered or "cookie" in lowered


def _suspect_bytes(data: bytes) -> bool:
    lowered = data.lower()
    return b"token" in lowered or b"authorization" in lowered or b"bearer" in lowered or b"cookie" in lowered


def _authorization(match: re.Match[str]) -> str:
    value = match["value"]
    if not value.strip():
        return match[0]
    return match["head"] + redact_credentials(value)


def redact(text: str) -> str:
    """`text` with every token replaced by `[redacted]` (query, header, subprotocol, JSON field)."""
    lowered = text.lower()
    # Each pattern runs only where its word is: most suspect lines hold one of them.
    if "authorization" in lowered:
        text = AUTHORIZATION.sub(_authorization, text)
    if "bearer" in lowered:
        text = TOKEN_SUBPROTOCOL.sub(REDACTED, text)
        text = BEARER.sub(REDACTED, text)
    if "token" in lowered:
        text = TOKEN_IN_QUERY.sub(REDACTED, text)
        text = TOKEN_FIELD.sub(REDACTED, text)
    if "cookie" in lowered:
        text = COOKIE.sub(REDACTED, text)
    return text


def redact_credentials(value: str) -> str:
    """An Authorization header's value: the scheme word stays (`Bearer [redacted]`)."""
    leading = value[: len(value) - len(value.lstrip())]
    scheme, space, credentials = value.strip().partition(" ")
    if space and credentials.strip():
        return f"{leading}{scheme} [redacted]"
    return f"{leading}[redacted]"


def _redact_arg(arg: object, header_name: object) -> object:
    """A string or bytes argument redacted (the same type back); `header_name` is the argument
    before it, for `"< %s: %s", name, value` calls."""
    if isinstance(arg, bytes):
        if isinstance(header_name, bytes):
            header_name = header_name.decode("latin-1")
        if _is_credential_header(header_name) or _suspect_bytes(arg):
            redacted = _redact_arg(arg.decode("latin-1"), header_name)
            assert isinstance(redacted, str)
            return redacted.encode("latin-1")
        return arg
    if not isinstance(arg, str):
        return arg
    if _is_credential_header(header_name):
        return redact_credentials(arg) if "auth" in str(header_name).lower() else "[redacted]"
    return redact(arg) if _suspect(arg) else arg


def _is_credential_header(name: object) -> bool:
    """Whether `name` is a header whose value is a credential (logged just before that value)."""
    return isinstance(name, str) and name.strip().lower() in CREDENTIAL_HEADERS


#: What `_scan` finds in a record's arguments.
_CLEAN, _PLAIN_SUSPECT, _OBJECT = 0, 1, 2


def _scan(args: tuple[object, ...]) -> int:
    """Whether the arguments are plain and token-free (the common case, nothing to do), plain
    with one that may hold a token (or name a credential header), or hold an object (a dict,
    header pairs, `Headers`, a frame) whose text is only known once rendered."""
    found = _CLEAN
    for arg in args:
        if isinstance(arg, str):
            if _suspect(arg):
                found = _PLAIN_SUSPECT
        elif isinstance(arg, bytes):
            if _suspect_bytes(arg):
                found = _PLAIN_SUSPECT
        elif not (arg is None or isinstance(arg, int | float)):
            return _OBJECT
    return found


class RedactTokens(logging.Filter):
    """Replaces tokens in a record's message, arguments and exception text; never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(record.msg, str) and isinstance(args, tuple):
            if _suspect(record.msg):
                record.msg = redact(record.msg)
            found = _scan(args)
            if found == _PLAIN_SUSPECT:
                # Redacted in place, each argument keeping its type and position.
                record.args = tuple(_redact_arg(arg, args[i - 1] if i else None) for i, arg in enumerate(args))
            elif found == _OBJECT:
                self._redact_rendered(record)
        else:
            self._redact_rendered(record)
        if record.exc_info:
            self._redact_exception(record)
        return True

    @staticmethod
    def _redact_rendered(record: logging.LogRecord) -> None:
        # An object's text (a dict, header pairs, `Headers`, a frame) is only known once
        # rendered; the record keeps its arguments unless the rendering held a token.
        try:
            message = record.getMessage()
        except Exception:
            return  # a broken call: the handler reports it
        if _suspect(message):
            redacted = redact(message)
            if redacted != message:
                record.msg, record.args = redacted, ()

    @staticmethod
    def _redact_exception(record: logging.LogRecord) -> None:
        # Formatters print `exc_text` when it is set rather than formatting the exception again.
        assert record.exc_info
        text = record.exc_text or _exception_formatter.formatException(record.exc_info)
        if _suspect(text):
            redacted = redact(text)
            if redacted != text:
                record.exc_text = redacted


def install(logger_names: tuple[str, ...] = UVICORN_LOGGERS) -> None:
    """Add the filter to these loggers once (idempotent); cheap and safe before the server starts.

    A logger's filters see only records created on that logger, not those its children
    propagate, so the filter goes on each logger that creates them rather than on `uvicorn`.
    `logging.config.dictConfig` (uvicorn's log config) keeps the filters of existing loggers.
    """
    for name in logger_names:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactTokens) for f in logger.filters):
            logger.addFilter(RedactTokens())
