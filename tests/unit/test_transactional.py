"""`connection=`: recognising the app's connection without importing its driver, refusing what
cannot join a transaction, and checking everything before a statement is sent (fakes that record
the statements; `tests/integration/test_transactional_publish.py` runs the real drivers)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
from collections.abc import Sequence
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from starlette_dream_ws import apublish, asend_image_update, publish, send_image_update
from starlette_dream_ws.groups.backends.postgres import (
    DEFAULT_TABLE,
    MAX_MESSAGE_BYTES,
    HistorySQL,
    PayloadTooLarge,
)
from starlette_dream_ws.protocol import Position
from starlette_dream_ws.settings import ConfigurationError, Settings
from starlette_dream_ws.transactional import (
    Driver,
    NotInTransaction,
    _pyformat,
    _text,
    apublish_in_transaction,
    detect,
    publish_in_transaction,
)

pytestmark = pytest.mark.anyio

ON_POSTGRES = Settings(broadcast_url="postgresql://app@db/app", state_ttl=60, history_size=7)
IDLE, INTRANS = 0, 2


def made_in(module: str, name: str, *bases: type, **members: Any) -> type:
    """A class named `name` that says it comes from `module`, as a driver's classes do."""
    return type(name, bases, {"__module__": module, **members})


class Recorder:
    """What a fake connection was asked to run: (statement, parameters) pairs."""

    def __init__(self) -> None:
        self.statements: list[tuple[str, Any]] = []
        self.threads: list[int] = []

    def record(self, statement: str, params: Any) -> None:
        self.statements.append((statement, params))
        self.threads.append(threading.get_ident())


class FakeCursor:
    def __init__(self, recorder: Recorder, row_factory: Any) -> None:
        self.recorder, self.row_factory, self.closed = recorder, row_factory, False

    def execute(self, query: str, params: Any) -> FakeCursor:
        self.recorder.record(query, params)
        return self

    def fetchone(self) -> Sequence[Any]:
        return ("ep0ch", 7, None)

    def close(self) -> None:
        self.closed = True


class FakeInfo:
    def __init__(self, status: int) -> None:
        self.transaction_status = status


def _psycopg_cursor(self: Any, *, row_factory: Any) -> FakeCursor:
    cursor = FakeCursor(self.recorder, row_factory)
    self.cursors.append(cursor)
    return cursor


def _psycopg_init(self: Any, autocommit: bool = False, status: int = IDLE) -> None:
    self.autocommit, self.info, self.recorder, self.cursors = autocommit, FakeInfo(status), Recorder(), []


PsycopgConnection = made_in("psycopg", "Connection", __init__=_psycopg_init, cursor=_psycopg_cursor)
PsycopgAsyncConnection = made_in("psycopg", "AsyncConnection")


def _transaction_init(self: Any, connection: object) -> None:
    self.connection = connection


PsycopgTransaction = made_in("psycopg", "Transaction", __init__=_transaction_init)


def _asyncpg_init(self: Any, in_transaction: bool = True) -> None:
    self.in_transaction, self.recorder = in_transaction, Recorder()


async def _asyncpg_fetchrow(self: Any, query: str, *args: Any) -> Sequence[Any]:
    self.recorder.record(query, args)
    return ("ep0ch", 7, None)


async def _asyncpg_execute(self: Any, query: str, *args: Any) -> str:
    self.recorder.record(query, args)
    return "DELETE 0"


AsyncpgConnection = made_in(
    "asyncpg.connection",
    "Connection",
    __init__=_asyncpg_init,
    is_in_transaction=lambda self: self.in_transaction,
    fetchrow=_asyncpg_fetchrow,
    execute=_asyncpg_execute,
)


# -- recognising the connection ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("connection", "driver"),
    [
        (PsycopgConnection(), Driver.PSYCOPG),
        (made_in("myapp.db", "TracedConnection", PsycopgConnection)(), Driver.PSYCOPG),  # an app's subclass
        (PsycopgAsyncConnection(), Driver.PSYCOPG_ASYNC),
        (AsyncpgConnection(), Driver.ASYNCPG),
        (made_in("asyncpg.pool", "PoolConnectionProxy")(), Driver.ASYNCPG),
        (made_in("sqlalchemy.engine.base", "Connection")(), Driver.SQLALCHEMY),
        (made_in("sqlalchemy.ext.asyncio.engine", "AsyncConnection")(), Driver.SQLALCHEMY_ASYNC),
        (Session(), Driver.SQLALCHEMY),
        (AsyncSession(), Driver.SQLALCHEMY_ASYNC),
    ],
)
def test_each_supported_kind_of_connection_is_recognised(connection: object, driver: Driver) -> None:
    assert detect(connection).driver is driver


def test_a_psycopg_transaction_runs_on_its_connection_and_sessions_are_told_apart() -> None:
    connection = PsycopgConnection()
    assert detect(PsycopgTransaction(connection)).target is connection
    assert detect(Session()).session and detect(AsyncSession()).session
    assert not detect(made_in("sqlalchemy.engine.base", "Connection")()).session


@pytest.mark.parametrize(
    ("connection", "hint"),
    [
        (object(), "got builtins.object"),
        ("postgresql://app@db/app", "got builtins.str"),
        (sqlite3.connect(":memory:"), "got sqlite3.Connection"),
        (made_in("psycopg2.extensions", "connection")(), "psycopg2 is not supported directly"),
        (made_in("psycopg_pool.pool", "ConnectionPool")(), "pass a connection from `pool.connection()`"),
        (made_in("asyncpg.pool", "Pool")(), "pass a connection acquired from it"),
        (made_in("asyncpg.transaction", "Transaction")(), "pass the connection, inside"),
        (made_in("sqlalchemy.engine.base", "Engine")(), "pass a Session or a Connection"),
        (made_in("psycopg", "Cursor")(), "got psycopg.Cursor"),
    ],
)
def test_anything_else_is_a_type_error_that_names_what_is_accepted(connection: object, hint: str) -> None:
    with pytest.raises(TypeError, match="connection= takes a psycopg 3 Connection") as raised:
        detect(connection)
    assert hint in str(raised.value)


def test_the_module_imports_no_driver_and_works_without_any() -> None:
    script = """
import sys
for name in ("psycopg", "asyncpg", "sqlalchemy"):
    sys.modules[name] = None  # importing it now fails, as when it is not installed
import starlette_dream_ws.transactional as transactional
from starlette_dream_ws import send_image_update, asend_image_update
Fake = type("Connection", (), {"__module__": "psycopg"})
assert transactional.detect(Fake()).driver is transactional.Driver.PSYCOPG
try:
    transactional.detect(object())
except TypeError:
    print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert (done.returncode, done.stdout.strip()) == (0, "ok"), done.stderr


# -- sync and async forms ---------------------------------------------------------------------------


async def test_an_async_connection_given_to_a_sync_form_is_a_type_error() -> None:
    for connection in (AsyncSession(), AsyncpgConnection(), PsycopgAsyncConnection()):
        with pytest.raises(TypeError, match="await the async form"):
            send_image_update(1, None, "completed", settings=ON_POSTGRES, connection=connection)
        with pytest.raises(TypeError, match="await the async form"):
            publish("dream_images_1", {"type": "image_update"}, settings=ON_POSTGRES, connection=connection)


async def test_a_sync_connection_given_to_an_async_form_is_a_type_error() -> None:
    # An unbound Session would fail on its first statement: the mismatch is found before.
    for connection in (Session(), PsycopgConnection()):
        with pytest.raises(TypeError, match="call the sync form"):
            await asend_image_update(1, None, "completed", settings=ON_POSTGRES, connection=connection)
        with pytest.raises(TypeError, match="call the sync form"):
            await apublish("dream_images_1", {"type": "image_update"}, settings=ON_POSTGRES, connection=connection)


def test_the_sync_form_runs_in_the_calling_thread_on_the_callers_connection() -> None:
    connection = PsycopgConnection()
    caller: list[int] = []

    def work() -> None:
        caller.append(threading.get_ident())
        send_image_update(3, ["https://cdn.example/3.png"], "completed", settings=ON_POSTGRES, connection=connection)

    worker = threading.Thread(target=work)
    worker.start()
    worker.join(10)
    assert len(connection.recorder.statements) == 2
    assert set(connection.recorder.threads) == set(caller)


# -- what is sent -----------------------------------------------------------------------------------


def test_the_backends_statements_are_sent_with_the_callers_driver_style() -> None:
    connection = PsycopgConnection()
    position = publish_in_transaction(connection, "dream_images_3", {"type": "image_update"}, settings=ON_POSTGRES)
    assert position == Position("ep0ch", 7)
    sql = HistorySQL(DEFAULT_TABLE)
    (publish_sql, publish_args), (trim_sql, trim_args) = connection.recorder.statements
    assert (publish_sql, trim_sql) == (_pyformat(sql.publish), _pyformat(sql.trim))
    assert "$" not in publish_sql + trim_sql
    assert publish_args["p1"] == ["dream_images_3"] and publish_args["p3"] == 60.0 and publish_args["p4"] == 1
    assert publish_args["p5"] == '{"type":"image_update"}'
    assert trim_args == {"p1": "dream_images_3", "p2": "ep0ch", "p3": 7, "p4": 7}
    # Rows as tuples whatever row factory the app set, and the cursor closed.
    from psycopg.rows import tuple_row

    assert all(cursor.row_factory is tuple_row and cursor.closed for cursor in connection.cursors)


def test_a_raw_cursor_factory_gets_the_backends_statements_unchanged() -> None:
    # psycopg's RawCursor takes `$n` and positional parameters, as asyncpg does.
    raw = made_in("psycopg", "RawCursor", made_in("psycopg.raw_cursor", "RawCursorMixin"), FakeCursor)

    def cursor(self: Any, *, row_factory: Any) -> FakeCursor:
        made: FakeCursor = raw(self.recorder, row_factory)
        return made

    connection = made_in("app", "RawConnection", PsycopgConnection, cursor=cursor)()
    publish_in_transaction(connection, "dream_images_3", {"type": "image_update"}, settings=ON_POSTGRES)
    sql = HistorySQL(DEFAULT_TABLE)
    (publish_sql, publish_args), (trim_sql, trim_args) = connection.recorder.statements
    assert (publish_sql, trim_sql) == (sql.publish, sql.trim)
    assert publish_args[0] == ["dream_images_3"] and trim_args == ["dream_images_3", "ep0ch", 7, 7]


async def test_asyncpg_gets_the_backends_statements_unchanged() -> None:
    connection = AsyncpgConnection()
    await apublish_in_transaction(connection, "dream_images_3", {"type": "image_update"}, settings=ON_POSTGRES)
    sql = HistorySQL(DEFAULT_TABLE)
    (publish_sql, publish_args), (trim_sql, trim_args) = connection.recorder.statements
    assert (publish_sql, trim_sql) == (sql.publish, sql.trim)
    assert publish_args[0] == ["dream_images_3"] and trim_args == ("dream_images_3", "ep0ch", 7, 7)


def test_sqlalchemy_binds_every_parameter_by_name() -> None:
    # `:p1::text` would bind a parameter `p`: the converted statements bind p1..pn, nothing else.
    sql = HistorySQL(DEFAULT_TABLE)
    for statement, count in ((sql.publish, 5), (sql.trim, 4)):
        compiled = _text(statement).compile()
        assert set(compiled.params) == {f"p{n}" for n in range(1, count + 1)}


# -- refused before anything is written -------------------------------------------------------------


def test_a_connection_that_commits_each_statement_is_refused() -> None:
    connection = PsycopgConnection(autocommit=True, status=IDLE)
    with pytest.raises(NotInTransaction, match="autocommit"):
        send_image_update(1, settings=ON_POSTGRES, connection=connection)
    assert connection.recorder.statements == []
    # In autocommit mode inside a transaction block, or without autocommit, it joins.
    send_image_update(1, settings=ON_POSTGRES, connection=PsycopgConnection(autocommit=True, status=INTRANS))
    send_image_update(1, settings=ON_POSTGRES, connection=PsycopgConnection(autocommit=False, status=IDLE))


async def test_an_asyncpg_connection_outside_a_transaction_is_refused() -> None:
    connection = AsyncpgConnection(in_transaction=False)
    with pytest.raises(NotInTransaction, match=r"connection\.transaction\(\)"):
        await asend_image_update(1, settings=ON_POSTGRES, connection=connection)
    assert connection.recorder.statements == []


def _sqlalchemy_connection(dialect: str, autocommit: bool) -> Any:
    recorder = Recorder()

    class Pooled:
        dbapi_connection = type("DBAPIConnection", (), {"autocommit": autocommit})()

    def execute(self: Any, statement: Any, parameters: Any) -> Any:
        recorder.record(str(statement), parameters)
        raise AssertionError("no statement should run")

    connection = made_in(
        "sqlalchemy.engine.base",
        "Connection",
        dialect=type("Dialect", (), {"name": dialect})(),
        connection=Pooled(),
        execute=execute,
    )()
    connection.recorder = recorder
    return connection


def test_sqlalchemy_in_autocommit_or_not_on_postgresql_is_refused() -> None:
    autocommit = _sqlalchemy_connection("postgresql", autocommit=True)
    with pytest.raises(NotInTransaction, match="AUTOCOMMIT"):
        send_image_update(1, settings=ON_POSTGRES, connection=autocommit)
    elsewhere = _sqlalchemy_connection("mysql", autocommit=False)
    with pytest.raises(TypeError, match="PostgreSQL is needed, not to mysql"):
        send_image_update(1, settings=ON_POSTGRES, connection=elsewhere)
    assert autocommit.recorder.statements == elsewhere.recorder.statements == []


@pytest.mark.parametrize("url", ["redis://:s3cret@cache:6379/0", "memory://"])
async def test_servers_not_on_postgresql_are_a_configuration_error(url: str) -> None:
    connection = PsycopgConnection()
    with pytest.raises(ConfigurationError, match="servers to listen on PostgreSQL") as raised:
        send_image_update(1, settings=Settings(broadcast_url=url), connection=connection)
    assert isinstance(raised.value, ValueError) and "s3cret" not in str(raised.value)
    with pytest.raises(ConfigurationError):
        await asend_image_update(1, settings=Settings(broadcast_url=url), connection=AsyncpgConnection())
    assert connection.recorder.statements == []


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda c: send_image_update(0, settings=ON_POSTGRES, connection=c), ValueError),
        (lambda c: send_image_update(1, None, "done", settings=ON_POSTGRES, connection=c), ValueError),
        (lambda c: send_image_update(1, "https://one.example", settings=ON_POSTGRES, connection=c), TypeError),
        (lambda c: publish("no spaces", {"type": "x"}, settings=ON_POSTGRES, connection=c), ValueError),
        (lambda c: publish("g", {"kind": "x"}, settings=ON_POSTGRES, connection=c), ValueError),
        (lambda c: publish("g", {"type": "x", "n": float("nan")}, settings=ON_POSTGRES, connection=c), ValueError),
        (
            lambda c: publish("g", {"type": "x", "big": "x" * MAX_MESSAGE_BYTES}, settings=ON_POSTGRES, connection=c),
            PayloadTooLarge,
        ),
    ],
)
def test_bad_updates_are_refused_before_any_statement(call: Any, error: type[Exception]) -> None:
    connection = PsycopgConnection()
    with pytest.raises(error):
        call(connection)
    assert connection.recorder.statements == []
