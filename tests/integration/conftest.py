"""Fixtures of the integration suite: one Redis per session, uvicorn servers per module.

The groups backend is configuration only, so the tests of `servers` run once per backend:
on Redis, then on PostgreSQL (started only when a test needs it). The helpers the tests import
live in `tests/support/`."""

from __future__ import annotations

from collections.abc import Generator, Iterator

import pytest
import redis

from tests.support.postgres import FLUSH_SQL, PostgresServer
from tests.support.processes import workdir
from tests.support.redis import RedisServer
from tests.support.tokens import TokenFactory, mint_token
from tests.support.uvicorn import UvicornServer, server_env, servers_in, serving

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


@pytest.fixture(autouse=True)
def _flush_backends(redis_server: RedisServer, request: pytest.FixtureRequest) -> None:
    """No test sees the latest states another test recorded."""
    with redis.Redis.from_url(redis_server.url) as client:
        client.flushall()
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("backend_url") == "postgres":
        request.getfixturevalue("postgres_server").sql(FLUSH_SQL)


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
    return mint_token


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failed test shows the end of the log of every server it used."""
    report = yield
    if report.failed and call.when == "call":
        funcargs = getattr(item, "funcargs", {})
        for server in (server for value in funcargs.values() for server in servers_in(value)):
            report.sections.append((f"uvicorn {server.base_url} log (tail)", server.log_text()[-4000:]))
    return report
