"""Fixtures of the integration suite: one Redis per session, uvicorn servers per module.

The groups backend is configuration only, so the tests of `servers` run once per backend:
on Redis, then on PostgreSQL (started only when a test needs it)."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import redis

from .postgres import PostgresServer
from .servers import RedisServer, UvicornServer, start_all, stop_and_check

#: HS256 secret shared by the servers and the token helper (>= 32 bytes, as PyJWT wants).
JWT_SECRET = "integration-secret-0123456789abcdef-0123456789"
OTHER_SECRET = "not-the-servers-secret-0123456789abcdef-987654"

TokenFactory = Callable[..., str]

#: The groups backends `servers` runs on (the `backend_url` parameter).
BACKENDS = ("redis", "postgres")


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(workdir=tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    """Started on first request: a run without PostgreSQL tests does not pay for it."""
    with PostgresServer(workdir=tmp_path_factory.mktemp("postgres")) as server:
        yield server


@pytest.fixture(scope="module", params=BACKENDS)
def backend_url(request: pytest.FixtureRequest) -> str:
    """The URL of the groups backend `servers` use; give it to the producers too."""
    server: RedisServer | PostgresServer = request.getfixturevalue(f"{request.param}_server")
    return server.url


#: Empties what the PostgreSQL backend (history, latest states) and state store keep.
POSTGRES_FLUSH = """DO $$ DECLARE name text; BEGIN
    FOREACH name IN ARRAY ARRAY['dream_ws_history', 'dream_ws_latest'] LOOP
        IF to_regclass(name) IS NOT NULL THEN EXECUTE format('TRUNCATE %I', name); END IF;
    END LOOP;
END $$"""


@pytest.fixture(autouse=True)
def _flush_backends(redis_server: RedisServer, request: pytest.FixtureRequest) -> None:
    """No test sees the latest states another test recorded."""
    with redis.Redis.from_url(redis_server.url) as client:
        client.flushall()
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("backend_url") == "postgres":
        request.getfixturevalue("postgres_server").sql(POSTGRES_FLUSH)


def server_env(backend_url: str, **extra: str) -> dict[str, str]:
    """Groups and latest state on `backend_url` (Redis or PostgreSQL), and the tokens' secret."""
    return {
        "DREAM_WS_BROADCAST_URL": backend_url,
        "DREAM_WS_STATE_URL": backend_url,
        "DREAM_WS_JWT_SECRET": JWT_SECRET,
        **extra,
    }


@contextlib.contextmanager
def serving(*servers: UvicornServer) -> Iterator[None]:
    """Run the servers; afterwards stop them and fail if one did not shut down cleanly."""
    try:
        start_all(servers)
        yield
    finally:
        problems = stop_and_check(servers)
        for server in servers:
            server.close()
    assert not problems, "\n".join(problems)


def workdir(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """A directory for a process's files under pytest's base temp, which pytest rotates.

    Logs stay there for a post-mortem, also when pytest itself was killed."""
    return tmp_path_factory.mktemp(name)


@pytest.fixture(scope="module")
def servers(
    backend_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[UvicornServer, UvicornServer]]:
    """Servers A and B: two uvicorn processes sharing the session's Redis, or its PostgreSQL."""
    env = server_env(backend_url)
    pair = (
        UvicornServer(env, workdir=workdir(tmp_path_factory, "server-a")),
        UvicornServer(env, workdir=workdir(tmp_path_factory, "server-b")),
    )
    with serving(*pair):
        yield pair


@pytest.fixture
def make_token() -> TokenFactory:
    """`make_token("u7")`: an HS256 JWT for that user, valid 5 minutes (tune with keywords)."""

    def make(sub: str, *, expires_in: float = 300.0, secret: str = JWT_SECRET, **claims: object) -> str:
        # A fresh `jti` makes every token unique, so a token found in a log is this one.
        payload = {"sub": sub, "exp": int(time.time() + expires_in), "jti": uuid.uuid4().hex, **claims}
        return jwt.encode(payload, secret, algorithm="HS256")

    return make


def _servers_in(value: Any) -> list[UvicornServer]:
    if isinstance(value, UvicornServer):
        return [value]
    if isinstance(value, tuple | list):
        return [server for item in value for server in _servers_in(item)]
    return []


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failed test shows the end of the log of every server it used."""
    report = yield
    if report.failed and call.when == "call":
        funcargs = getattr(item, "funcargs", {})
        for server in (server for value in funcargs.values() for server in _servers_in(value)):
            report.sections.append((f"uvicorn {server.base_url} log (tail)", server.log_text()[-4000:]))
    return report
