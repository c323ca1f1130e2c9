"""SIGTERM: every connection is closed with 1001, then the process exits cleanly and soon."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import pytest

from tests.support.redis import RedisServer
from tests.support.tokens import TokenFactory
from tests.support.uvicorn import UvicornServer, server_env

from .client import connect_dream, established, expect_close

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

CLIENTS = 20
#: The bound on shutdown we promise: uvicorn's own wait plus our close, well under this.
SHUTDOWN_BOUND = 5.0


@pytest.mark.parametrize(
    ("app", "mount"),
    [("served_app:app", ""), ("served_app:mounted_with_lifespan", "/ws")],
    ids=["standalone", "mounted"],
)
async def test_sigterm_closes_every_connection_with_1001(
    redis_server: RedisServer,
    make_token: TokenFactory,
    tmp_path: Path,
    app: str,
    mount: str,
    request: pytest.FixtureRequest,
) -> None:
    server = UvicornServer(server_env(redis_server.url), app, mount=mount, workdir=tmp_path)
    try:
        server.start()
        async with contextlib.AsyncExitStack() as stack:
            clients = []
            for n in range(CLIENTS):
                dream = 1 + n % 4
                ws = await stack.enter_async_context(connect_dream(server, dream, make_token("admin")))
                await established(ws, dream)
                clients.append(ws)
            started = time.monotonic()
            stopping = asyncio.create_task(asyncio.to_thread(server.stop))  # SIGTERM, then wait for exit
            codes = await asyncio.gather(*(expect_close(ws) for ws in clients))
            await stopping
            took = time.monotonic() - started
        assert codes == [1001] * CLIENTS
        assert took < SHUTDOWN_BOUND, f"shutdown took {took:.2f}s"
        assert server.shutdown_problems() == []  # exit status, graceful lifespan end, no traceback
        request.node.user_properties.append(("shutdown_seconds", round(took, 3)))
        print(f"{app}: {CLIENTS} clients closed with 1001, process exited {took:.2f}s after SIGTERM")
    finally:
        server.close()
