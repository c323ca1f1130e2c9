"""Publishing inside the app's own PostgreSQL transaction (`connection=`), against a real
PostgreSQL and a real uvicorn server listening on it, with a WebSocket client watching the dream.

For each kind of connection an app may hold (psycopg sync and async, asyncpg, SQLAlchemy sync
and async): a committed update arrives once with the next seq, a rolled-back one never arrives
nor shows in history, concurrent transactions deliver in commit order with gap-free seqs, and an
update committed while the server is dead is delivered once from history when the client resumes.
"""

# asyncpg ships no type information (as in the backend).
# mypy: disable-error-code="import-untyped"

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, Protocol

import asyncpg
import psycopg
import pytest
from psycopg.rows import dict_row
from sqlalchemy import create_engine, text
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from starlette_dream_ws import asend_image_update, send_image_update
from starlette_dream_ws.settings import Settings
from starlette_dream_ws.transactional import NotInTransaction
from tests.support.postgres import PostgresServer
from tests.support.processes import workdir
from tests.support.tokens import TokenFactory
from tests.support.uvicorn import UvicornServer, server_env, serving

from .client import connect_dream, established, recv_json, send_json

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

#: Seconds a check that nothing arrives waits (an update in flight arrives in milliseconds).
QUIET = 0.3
#: Seconds any wait for a condition may take.
TIMEOUT = 5.0
#: The app's own table, written in the same transactions as the updates.
JOBS = "tx_app_jobs"

#: Dream ids of this module: each test watches dreams no other test publishes to.
_dreams = itertools.count(9001)


class AppTransaction(Protocol):
    """One of the app's transactions, on a connection of its own."""

    async def write(self, dream: int, note: str) -> None:
        """The app's own write (a job row)."""

    async def publish(self, dream: int, note: str) -> None:
        """`send_image_update(..., connection=...)` (or the async form) in this transaction."""

    async def commit(self) -> None: ...
    async def rollback(self) -> None: ...
    async def close(self) -> None: ...


def _insert_job(dream: int, note: str) -> tuple[str, dict[str, Any]]:
    return f"INSERT INTO {JOBS} (dream, note) VALUES (:dream, :note)", {"dream": dream, "note": note}


class PsycopgTransaction:
    """A psycopg 3 sync connection without autocommit: the first statement opens the transaction.
    Its calls run in worker threads, as a sync app's would, one at a time."""

    def __init__(self, url: str, settings: Settings) -> None:
        self.settings = settings
        self.connection = psycopg.connect(url)

    @classmethod
    async def open(cls, url: str, settings: Settings) -> PsycopgTransaction:
        return await asyncio.to_thread(cls, url, settings)

    async def write(self, dream: int, note: str) -> None:
        await asyncio.to_thread(self.connection.execute, f"INSERT INTO {JOBS} VALUES (%s, %s)", (dream, note))

    async def publish(self, dream: int, note: str) -> None:
        await asyncio.to_thread(
            send_image_update, dream, None, "processing", note, settings=self.settings, connection=self.connection
        )

    async def commit(self) -> None:
        await asyncio.to_thread(self.connection.commit)

    async def rollback(self) -> None:
        await asyncio.to_thread(self.connection.rollback)

    async def close(self) -> None:
        await asyncio.to_thread(self.connection.close)


class PsycopgAsyncTransaction:
    """A psycopg 3 AsyncConnection in autocommit mode, inside an explicit transaction block
    (whose transaction object is what the app passes)."""

    def __init__(self, connection: psycopg.AsyncConnection[Any], settings: Settings) -> None:
        self.connection = connection
        self.settings = settings
        self.stack = contextlib.AsyncExitStack()
        self.block: psycopg.AsyncTransaction | None = None

    @classmethod
    async def open(cls, url: str, settings: Settings) -> PsycopgAsyncTransaction:
        opened = cls(await psycopg.AsyncConnection.connect(url, autocommit=True), settings)
        opened.block = await opened.stack.enter_async_context(opened.connection.transaction())
        return opened

    async def write(self, dream: int, note: str) -> None:
        await self.connection.execute(f"INSERT INTO {JOBS} VALUES (%s, %s)", (dream, note))

    async def publish(self, dream: int, note: str) -> None:
        await asend_image_update(dream, None, "processing", note, settings=self.settings, connection=self.block)

    async def commit(self) -> None:
        await self.stack.aclose()

    async def rollback(self) -> None:
        # Leaving the block with psycopg's Rollback rolls it back (and swallows the exception).
        await self.stack.__aexit__(psycopg.Rollback, psycopg.Rollback(), None)

    async def close(self) -> None:
        await self.connection.close()


class AsyncpgTransaction:
    def __init__(self, connection: Any, settings: Settings) -> None:
        self.connection = connection
        self.settings = settings
        self.transaction = connection.transaction()

    @classmethod
    async def open(cls, url: str, settings: Settings) -> AsyncpgTransaction:
        opened = cls(await asyncpg.connect(url), settings)
        await opened.transaction.start()
        return opened

    async def write(self, dream: int, note: str) -> None:
        await self.connection.execute(f"INSERT INTO {JOBS} VALUES ($1, $2)", dream, note)

    async def publish(self, dream: int, note: str) -> None:
        await asend_image_update(dream, None, "processing", note, settings=self.settings, connection=self.connection)

    async def commit(self) -> None:
        await self.transaction.commit()

    async def rollback(self) -> None:
        await self.transaction.rollback()

    async def close(self) -> None:
        await self.connection.close()


class SqlAlchemyTransaction:
    """A SQLAlchemy Session (on psycopg), in worker threads: its transaction begins by itself."""

    def __init__(self, url: str, settings: Settings) -> None:
        self.settings = settings
        self.engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1), poolclass=NullPool)
        self.session = Session(self.engine)

    @classmethod
    async def open(cls, url: str, settings: Settings) -> SqlAlchemyTransaction:
        return await asyncio.to_thread(cls, url, settings)

    async def write(self, dream: int, note: str) -> None:
        statement, values = _insert_job(dream, note)
        await asyncio.to_thread(self.session.execute, text(statement), values)

    async def publish(self, dream: int, note: str) -> None:
        await asyncio.to_thread(
            send_image_update, dream, None, "processing", note, settings=self.settings, connection=self.session
        )

    async def commit(self) -> None:
        await asyncio.to_thread(self.session.commit)

    async def rollback(self) -> None:
        await asyncio.to_thread(self.session.rollback)

    async def close(self) -> None:
        await asyncio.to_thread(self.session.close)
        await asyncio.to_thread(self.engine.dispose)


class SqlAlchemyAsyncTransaction:
    """A SQLAlchemy AsyncSession (on asyncpg)."""

    def __init__(self, url: str, settings: Settings) -> None:
        self.settings = settings
        self.engine = create_async_engine(url.replace("postgresql://", "postgresql+asyncpg://", 1), poolclass=NullPool)
        self.session = AsyncSession(self.engine)

    @classmethod
    async def open(cls, url: str, settings: Settings) -> SqlAlchemyAsyncTransaction:
        return cls(url, settings)

    async def write(self, dream: int, note: str) -> None:
        statement, values = _insert_job(dream, note)
        await self.session.execute(text(statement), values)

    async def publish(self, dream: int, note: str) -> None:
        await asend_image_update(dream, None, "processing", note, settings=self.settings, connection=self.session)

    async def commit(self) -> None:
        await self.session.commit()

    async def rollback(self) -> None:
        await self.session.rollback()

    async def close(self) -> None:
        await self.session.close()
        await self.engine.dispose()


DRIVERS: dict[str, Callable[[str, Settings], Awaitable[AppTransaction]]] = {
    "psycopg": PsycopgTransaction.open,
    "psycopg-async": PsycopgAsyncTransaction.open,
    "asyncpg": AsyncpgTransaction.open,
    "sqlalchemy": SqlAlchemyTransaction.open,
    "sqlalchemy-async": SqlAlchemyAsyncTransaction.open,
}

Begin = Callable[[], Awaitable[AppTransaction]]


@pytest.fixture(scope="module")
def server(postgres_server: PostgresServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[UvicornServer]:
    """A server listening on the session's PostgreSQL (its backend creates the tables)."""
    postgres_server.sql(f"CREATE TABLE IF NOT EXISTS {JOBS} (dream int NOT NULL, note text NOT NULL)")
    started = UvicornServer(server_env(postgres_server.url), workdir=workdir(tmp_path_factory, "tx-server"))
    with serving(started):
        yield started


@pytest.fixture(params=list(DRIVERS))
async def begin(request: pytest.FixtureRequest, postgres_server: PostgresServer) -> AsyncIterator[Begin]:
    """`await begin()`: a new transaction of the app on a connection of its own, with the
    driver of the test's parameter; each is closed (rolled back if open) afterwards."""
    opener = DRIVERS[request.param]
    settings = Settings(broadcast_url=postgres_server.url)
    opened: list[AppTransaction] = []

    async def new() -> AppTransaction:
        transaction = await opener(postgres_server.url, settings)
        opened.append(transaction)
        return transaction

    try:
        yield new
    finally:
        for transaction in opened:
            await transaction.close()


@pytest.fixture
async def admin(postgres_server: PostgresServer) -> AsyncIterator[Any]:
    """A connection outside the app's transactions, to look at what the database holds."""
    connection = await asyncpg.connect(postgres_server.url)
    try:
        yield connection
    finally:
        await connection.close()


async def update(ws: ClientConnection) -> dict[str, Any]:
    message = await recv_json(ws)
    assert message["type"] == "image_update", message
    return message


async def nothing_arrives(ws: ClientConnection) -> None:
    with pytest.raises(TimeoutError):
        extra = await recv_json(ws, timeout=QUIET)
        raise AssertionError(f"nothing should have arrived, got {extra}")


async def kept_notes(admin: Any, dream: int) -> list[str]:
    """The messages PostgreSQL keeps as the dream's history, oldest first."""
    rows = await admin.fetch(
        "SELECT message::json->>'message' AS note FROM dream_ws_messages WHERE grp = $1 ORDER BY seq",
        f"dream_images_{dream}",
    )
    return [row["note"] for row in rows]


async def job_notes(admin: Any, dream: int) -> list[str]:
    return [row["note"] for row in await admin.fetch(f"SELECT note FROM {JOBS} WHERE dream = $1 ORDER BY note", dream)]


async def wait_for_lock_waiter(admin: Any) -> None:
    """Until a publish waits for the lock of its group's position row (held by another transaction)."""
    deadline = time.monotonic() + TIMEOUT
    query = (
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
        " AND query LIKE '%dream_ws_messages_positions%'"
    )
    while await admin.fetchval(query) < 1:
        assert time.monotonic() < deadline, "the second publish never waited for the first transaction's lock"
        await asyncio.sleep(0.02)


async def test_a_committed_update_arrives_once_with_the_next_seq(
    begin: Begin, server: UvicornServer, make_token: TokenFactory, admin: Any
) -> None:
    dream = next(_dreams)
    async with connect_dream(server, dream, make_token("admin")) as ws:
        greeting = await established(ws, dream)
        epoch, seq = greeting["epoch"], greeting["seq"]
        app = await begin()
        await app.write(dream, "rendering")
        await app.publish(dream, "rendering")
        await nothing_arrives(ws)  # not before the commit
        await app.commit()
        got = await update(ws)
        assert (got["message"], got["epoch"], got["seq"]) == ("rendering", epoch, seq + 1)
        # Once: the next thing the client gets is the next transaction's update.
        marker = await begin()
        await marker.publish(dream, "marker")
        await marker.commit()
        after = await update(ws)
        assert (after["message"], after["seq"]) == ("marker", seq + 2)
        await nothing_arrives(ws)
    assert await kept_notes(admin, dream) == ["rendering", "marker"]
    assert await job_notes(admin, dream) == ["rendering"]


async def test_a_rolled_back_update_never_arrives_nor_shows_in_history(
    begin: Begin, server: UvicornServer, make_token: TokenFactory, admin: Any
) -> None:
    dream = next(_dreams)
    token = make_token("admin")
    async with connect_dream(server, dream, token) as ws:
        greeting = await established(ws, dream)
        epoch, seq = greeting["epoch"], greeting["seq"]
        app = await begin()
        await app.write(dream, "never happened")
        await app.publish(dream, "never happened")
        await app.rollback()
        marker = await begin()
        await marker.publish(dream, "marker")
        await marker.commit()
        # The marker comes first, with the seq the rolled-back update had taken: no gap, nothing before it.
        got = await update(ws)
        assert (got["message"], got["epoch"], got["seq"]) == ("marker", epoch, seq + 1)
        await send_json(ws, {"type": "request_status"})
        assert await recv_json(ws) == got
        await nothing_arrives(ws)
    # Resuming from before both: history replays the marker alone.
    async with connect_dream(server, dream, token + f"&since={epoch}:{seq}") as ws:
        resumed = await established(ws, dream)
        assert (resumed["recovered"], resumed["seq"]) == (True, seq + 1)
        assert await update(ws) == got
        await nothing_arrives(ws)
    assert await kept_notes(admin, dream) == ["marker"]
    assert await job_notes(admin, dream) == []


async def test_concurrent_transactions_deliver_in_commit_order_with_gap_free_seqs(
    begin: Begin, server: UvicornServer, make_token: TokenFactory, admin: Any
) -> None:
    dream = next(_dreams)
    async with connect_dream(server, dream, make_token("admin")) as ws:
        seq = (await established(ws, dream))["seq"]

        # 1. The second publish waits for the first transaction to end (the group's row lock),
        # so it can only commit after it: two updates, in commit order.
        first, second = await begin(), await begin()
        await first.publish(dream, "first")
        waiting = asyncio.create_task(second.publish(dream, "second"))
        await wait_for_lock_waiter(admin)
        assert not waiting.done()
        await nothing_arrives(ws)
        await first.commit()
        await asyncio.wait_for(waiting, TIMEOUT)
        got = await update(ws)
        assert (got["message"], got["seq"]) == ("first", seq + 1)
        await nothing_arrives(ws)  # the second one is not committed yet
        await second.commit()
        got = await update(ws)
        assert (got["message"], got["seq"]) == ("second", seq + 2)

        # 2. Begun in one order, committed in the other: the seqs follow the commits.
        early, late = await begin(), await begin()
        await early.write(dream, "early")
        await late.write(dream, "late")
        await late.publish(dream, "late")
        await late.commit()
        await early.publish(dream, "early")
        await early.commit()

        # 3. A transaction that rolls back while another waits behind it leaves no gap.
        doomed, survivor = await begin(), await begin()
        await doomed.publish(dream, "doomed")
        waiting = asyncio.create_task(survivor.publish(dream, "survivor"))
        await wait_for_lock_waiter(admin)
        await doomed.rollback()
        await asyncio.wait_for(waiting, TIMEOUT)
        await survivor.commit()

        received = [await update(ws) for _ in range(3)]
        await nothing_arrives(ws)
    assert [m["message"] for m in received] == ["late", "early", "survivor"]
    assert [m["seq"] for m in received] == [seq + 3, seq + 4, seq + 5]
    assert await kept_notes(admin, dream) == ["first", "second", "late", "early", "survivor"]
    assert await job_notes(admin, dream) == ["early", "late"]


async def test_an_update_committed_while_the_server_is_dead_is_delivered_once_on_resume(
    begin: Begin, server: UvicornServer, make_token: TokenFactory, admin: Any
) -> None:
    dream = next(_dreams)
    token = make_token("admin")
    async with connect_dream(server, dream, token) as ws:
        greeting = await established(ws, dream)
        epoch, seq = greeting["epoch"], greeting["seq"]
        app = await begin()
        await app.publish(dream, "committed during the crash")
        # Frozen before the commit and killed after it: the notification is never delivered.
        os.kill(server.pid, signal.SIGSTOP)
        try:
            await app.commit()
        finally:
            server.kill()
        with pytest.raises(ConnectionClosed):
            await recv_json(ws)
    await asyncio.to_thread(server.start)
    async with connect_dream(server, dream, token + f"&since={epoch}:{seq}") as ws:
        resumed = await established(ws, dream)
        assert (resumed["recovered"], resumed["epoch"], resumed["seq"]) == (True, epoch, seq + 1)
        got = await update(ws)
        assert (got["message"], got["seq"]) == ("committed during the crash", seq + 1)
        marker = await begin()
        await marker.publish(dream, "marker")
        await marker.commit()
        after = await update(ws)
        assert (after["message"], after["seq"]) == ("marker", seq + 2)
        await nothing_arrives(ws)
    assert await kept_notes(admin, dream) == ["committed during the crash", "marker"]


async def test_connections_that_would_commit_each_statement_are_refused_before_writing(
    server: UvicornServer, postgres_server: PostgresServer, admin: Any
) -> None:
    """The real drivers' autocommit modes, one each, with no transaction for the update to join
    (`server` has created the tables they would write)."""
    url, dream = postgres_server.url, next(_dreams)
    settings = Settings(broadcast_url=url)

    def sync_refusals() -> None:
        with psycopg.connect(url, autocommit=True) as connection:
            with pytest.raises(NotInTransaction, match="autocommit"):
                send_image_update(dream, settings=settings, connection=connection)
        engine = create_engine(
            url.replace("postgresql://", "postgresql+psycopg://", 1), poolclass=NullPool, isolation_level="AUTOCOMMIT"
        )
        with Session(engine) as session, pytest.raises(NotInTransaction, match="AUTOCOMMIT"):
            send_image_update(dream, settings=settings, connection=session)
        engine.dispose()

    await asyncio.to_thread(sync_refusals)
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as connection:
        with pytest.raises(NotInTransaction, match="autocommit"):
            await asend_image_update(dream, settings=settings, connection=connection)
    connection = await asyncpg.connect(url)
    try:
        with pytest.raises(NotInTransaction, match="not in a transaction"):
            await asend_image_update(dream, settings=settings, connection=connection)
    finally:
        await connection.close()
    engine = create_async_engine(
        url.replace("postgresql://", "postgresql+asyncpg://", 1), poolclass=NullPool, isolation_level="AUTOCOMMIT"
    )
    async with AsyncSession(engine) as session:
        with pytest.raises(NotInTransaction, match="AUTOCOMMIT"):
            await asend_image_update(dream, settings=settings, connection=session)
    await engine.dispose()
    assert await kept_notes(admin, dream) == []
    positions = "SELECT count(*) FROM dream_ws_messages_positions WHERE grp = $1"
    assert await admin.fetchval(positions, f"dream_images_{dream}") == 0


async def test_the_apps_cursor_and_row_factories_do_not_matter(
    server: UvicornServer, postgres_server: PostgresServer, make_token: TokenFactory
) -> None:
    """Client-side binding (pgbouncer setups), raw `$n` cursors, rows as dicts: all publish."""
    dream = next(_dreams)
    settings = Settings(broadcast_url=postgres_server.url)
    factories = [psycopg.ClientCursor, psycopg.RawCursor]

    def publish_with(factory: type[psycopg.Cursor[Any]]) -> None:
        with psycopg.connect(postgres_server.url, cursor_factory=factory, row_factory=dict_row) as connection:
            send_image_update(dream, None, "processing", factory.__name__, settings=settings, connection=connection)

    async with connect_dream(server, dream, make_token("admin")) as ws:
        seq = (await established(ws, dream))["seq"]
        for factory in factories:
            await asyncio.to_thread(publish_with, factory)  # committed when the block ends
        received = [await update(ws) for _ in factories]
        await nothing_arrives(ws)
    assert [(m["message"], m["seq"]) for m in received] == [("ClientCursor", seq + 1), ("RawCursor", seq + 2)]


async def test_a_server_connecting_while_an_app_transaction_is_open_does_not_wait_for_it(
    server: UvicornServer, postgres_server: PostgresServer
) -> None:
    # The tables exist (the server made them): a backend connecting later must not run the
    # create script, whose CREATE INDEX would wait for the open transaction below.
    from starlette_dream_ws.groups.backends.postgres import PostgresBackend

    settings = Settings(broadcast_url=postgres_server.url)
    app_connection = await asyncpg.connect(postgres_server.url)
    backend = PostgresBackend(postgres_server.url)
    try:
        async with app_connection.transaction():
            await asend_image_update(next(_dreams), None, "processing", settings=settings, connection=app_connection)
            async with asyncio.timeout(5):
                await backend.connect()
            await backend.publish("dream_images_elsewhere", '{"type":"x"}')
            raise _RollBack
    except _RollBack:
        pass
    finally:
        await backend.disconnect()
        await app_connection.close()


class _RollBack(Exception):
    """Leaves the app's transaction without committing it."""
