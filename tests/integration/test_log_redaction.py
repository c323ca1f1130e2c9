"""No piece of a token reaches a real uvicorn's log at DEBUG or TRACE, whatever its `--ws` and `--http`.

At DEBUG, websockets (`--ws websockets-sansio`, `--ws websockets`) logs each handshake header and
the start and end of each frame on `uvicorn.error`; at TRACE, uvicorn logs each scope (query
string, subprotocols) on `uvicorn.asgi`. Each case connects with a token by each transport (query
string, `Authorization: Bearer`, subprotocol), renews one with `refresh_token`, opens two event
streams (token in the query string, in the header), stops the server and reads its whole log: no
piece of any token is in it, and the lines that would have held one are there, redacted, so the
test cannot pass because nothing was logged. Every `--ws` runs at both levels, over h11 at one and
httptools at the other.

The app is `served_app:mounted` (no lifespan) and readiness is a listening port: nothing calls the
app before the first handshake, so that handshake's lines are only clean if the filter was
installed when the app was built.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import NamedTuple

import httpx
import pytest

from tests.support.processes import workdir
from tests.support.servers import ServerKind, asgi_server
from tests.support.tokens import mint_token
from tests.support.uvicorn import UvicornServer, server_env, serving

from .client import RECEIVE_TIMEOUT, TRANSPORTS, Transport, connect_dream, established, recv_json, send_json

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

DREAM = 1
#: The shortest piece of a token's claims or signature that counts as a leak: websockets prints
#: only the start and the end of a long frame, so a token can show in pieces.
PIECE = 16


class Case(NamedTuple):
    ws: str
    http: str
    log_level: str


CASES = [
    Case("websockets-sansio", "httptools", "debug"),
    Case("websockets", "h11", "debug"),
    Case("wsproto", "h11", "debug"),
    Case("websockets-sansio", "h11", "trace"),
    Case("websockets", "httptools", "trace"),
    Case("wsproto", "httptools", "trace"),
]


@pytest.fixture(params=CASES, ids=["-".join(case) for case in CASES])
def case(request: pytest.FixtureRequest) -> Case:
    value: Case = request.param
    return value


@pytest.fixture
def server(case: Case, tmp_path_factory: pytest.TempPathFactory) -> Iterator[UvicornServer]:
    server = UvicornServer(
        server_env("memory://"),
        "served_app:mounted",
        mount="/ws",
        workdir=workdir(tmp_path_factory, "log-redaction"),
        options=["--ws", case.ws, "--http", case.http],
        log_level=case.log_level,
        ready_when="port",
    )
    with serving(server):
        yield server


def expected_lines(case: Case) -> list[str]:
    """Lines (lowercase: h11 and httptools give header names in lowercase) that held a token."""
    lines = [
        '"websocket /ws/dreams/1?token=[redacted]" [accepted]',
        '"get /ws/dreams/1/events?token=[redacted] http/1.1" 200',
    ]
    if case.ws != "wsproto":  # wsproto logs no handshake
        lines += [
            "debug:    < get /ws/dreams/1?token=[redacted] http/1.1",
            "debug:    < authorization: bearer [redacted]",
            "debug:    < sec-websocket-protocol: dream-ws.v1, dream-ws.bearer.[redacted]",
            """debug:    < text '{"type": "refresh_token", "token": "[redacted]"}'""",
        ]
    if case.log_level == "trace":
        lines += [
            "'query_string': b'token=[redacted]'",
            "'subprotocols': ['dream-ws.v1', 'dream-ws.bearer.[redacted]']",
        ]
    return lines


def pieces(token: str) -> set[str]:
    """Every run of `PIECE` characters in `token`'s claims and signature (its header is the same for all)."""
    _header, _, secret = token.partition(".")
    return {secret[i : i + PIECE] for i in range(len(secret) - PIECE + 1)}


def leaking_lines(log: str, tokens: Iterable[str]) -> list[str]:
    """The lines of `log` that hold a piece of one of `tokens`."""
    secret = set().union(*(pieces(token) for token in tokens))
    return [line for line in log.splitlines() if any(piece in line for piece in secret)]


async def greeted_over_websocket(server: UvicornServer, token: str, transport: Transport, renewal: str | None) -> None:
    """Connect, wait for the greeting, renew the token with `renewal` if given, close."""
    async with connect_dream(server, DREAM, token, transport) as ws:
        await established(ws, DREAM)
        if renewal is not None:
            await send_json(ws, {"type": "refresh_token", "token": renewal})
            answer = await recv_json(ws)
            while answer["type"] == "ping":
                answer = await recv_json(ws)
            assert answer["type"] == "token_refreshed", answer


async def greeted_over_event_stream(server: UvicornServer, token: str, transport: Transport) -> None:
    """Open `<mount>/dreams/1/events` with the token in the query string or the header, read
    until the greeting event, close."""
    url = f"{server.base_url}{server.mount}/dreams/{DREAM}/events"
    headers: dict[str, str] = {}
    if transport == "query":
        url += f"?token={token}"
    else:
        headers["Authorization"] = f"Bearer {token}"
    async with httpx.AsyncClient(timeout=RECEIVE_TIMEOUT) as client:
        async with client.stream("GET", url, headers=headers) as response:
            assert response.status_code == 200, await response.aread()
            async for line in response.aiter_lines():
                if line == "event: connection_established":
                    return
    raise AssertionError("the event stream ended before its greeting")


async def test_no_token_reaches_the_log(case: Case, server: UvicornServer) -> None:
    tokens: dict[str, str] = {}
    for transport in TRANSPORTS:
        tokens[transport] = mint_token(f"u{DREAM}")
        renewal = None
        if transport == "header":
            renewal = tokens["refresh_token"] = mint_token(f"u{DREAM}")
        await greeted_over_websocket(server, tokens[transport], transport, renewal)
    for transport in ("query", "header"):
        tokens[f"event stream, {transport}"] = token = mint_token(f"u{DREAM}")
        await greeted_over_event_stream(server, token, transport)
    # Stopped first: the whole log, to the last closing line, is on disk.
    server.stop()
    log = server.log_text()

    leaks = leaking_lines(log, tokens.values())
    assert not leaks, f"tokens in the {case.log_level} log of --ws {case.ws}:\n" + "\n".join(leaks)
    lowered = log.lower()
    missing = [line for line in expected_lines(case) if line not in lowered]
    assert not missing, f"not logged (so not checked): {missing}"


#: The other servers at their most verbose: what each logs of a handshake must hold no token.
OTHER_SERVERS: dict[ServerKind, tuple[str, ...]] = {
    "hypercorn": ("--access-logfile", "-"),
    "granian": ("--access-log",),
    "daphne": ("-v", "3"),  # Daphne has no --log-level: verbosity 3 is its debug output
}


@pytest.mark.parametrize("kind", list(OTHER_SERVERS))
async def test_no_token_reaches_the_debug_log_of_the_other_servers(
    kind: ServerKind, tmp_path_factory: pytest.TempPathFactory
) -> None:
    server = asgi_server(
        kind,
        server_env("memory://"),
        "served_app:mounted",
        mount="/ws",
        workdir=workdir(tmp_path_factory, f"log-redaction-{kind}"),
        options=OTHER_SERVERS[kind],
        log_level="debug",
    )
    tokens: dict[str, str] = {}
    # Started and stopped by hand: Daphne's own shutdown may log a traceback of its own
    # (`kill_all_applications`), which `serving` would count against the app.
    server.start()
    try:
        for transport in TRANSPORTS:
            tokens[transport] = mint_token(f"u{DREAM}")
            renewal = None
            if transport == "header":
                renewal = tokens["refresh_token"] = mint_token(f"u{DREAM}")
            await greeted_over_websocket(server, tokens[transport], transport, renewal)
        for transport in ("query", "header"):
            tokens[f"event stream, {transport}"] = token = mint_token(f"u{DREAM}")
            await greeted_over_event_stream(server, token, transport)
    finally:
        server.stop()
        server.close()
    log = server.log_text()
    leaks = leaking_lines(log, tokens.values())
    assert not leaks, f"tokens in the debug log of {kind}:\n" + "\n".join(leaks)
    # The requests were logged (else the check proves nothing); these servers log paths
    # without their query strings, and no header at any level.
    assert "/ws/dreams/1/events" in log and log.count("/ws/dreams/1") >= 5, log[-3000:]
