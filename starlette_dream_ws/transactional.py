"""Publishing inside the app's own PostgreSQL transaction: `send_image_update(..., connection=...)`.

An app that writes a job's status to its database and then publishes shows browsers a status
that never happened whenever its transaction rolls back after the publish. Given the app's
connection (or session), the update is instead written by the PostgreSQL backend's own
statements (`groups/backends/postgres.py`, `HistorySQL`) on that connection, inside the app's
transaction: the group's position row is upserted, the message inserted with its seq, the
group's history trimmed, and the NOTIFY the servers LISTEN for is queued. PostgreSQL delivers a
NOTIFY of a transaction at its commit, in commit order, and never after a rollback; a server that
misses it (it died right after the commit) finds the message in the history table when its
client resumes with `since`. So the update reaches browsers only if the transaction commits,
exactly once, in commit order.

What callers should know:

* The upsert locks the group's position row until the transaction ends: other publishers of
  that group (the backend's too) wait for it, and so does the greeting of a browser that
  connects to that group meanwhile (its server reads the position with the same upsert). That
  is what keeps seqs gap-free and in commit order, and why a long transaction should publish
  last, just before it commits.
* Until it ends, the transaction also holds its writes' table locks: a server whose backend
  (re)connects meanwhile waits for it (the backend's CREATE INDEX IF NOT EXISTS waits for every
  open writer of the table), and later publishes queue behind that wait.
* Publishing to several groups in one transaction locks them in call order: keep one order
  everywhere, or two transactions can deadlock (PostgreSQL then aborts one of them).
* Under REPEATABLE READ or SERIALIZABLE, a group another transaction published to since the
  snapshot was taken fails with a serialization error: retry the transaction, as for any other.
* Nothing is retried here: the caller's transaction decides.
* Expired groups are not purged here: that would lock rows of other groups until the caller
  commits. The backend's own publishes purge them; reads never see them meanwhile.

It works only when the servers listen on PostgreSQL (`broadcast_url` postgresql://, on the same
database as the connection): their backend creates the tables when it connects.

Drivers are recognised by the modules their classes come from, so none is imported here:
psycopg 3 (`Connection`, `AsyncConnection`, or a `transaction()` of either), asyncpg
(`Connection`, a pooled one too; async only) and SQLAlchemy on PostgreSQL (`Session`,
`AsyncSession`, `Connection`, `AsyncConnection`, scoped sessions). The statements need the
`postgres` extra (asyncpg): they live in the backend's module.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import importlib
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, cast
from urllib.parse import urlsplit

from .protocol import Position, check_event, check_group, encode
from .settings import ConfigurationError, Settings

if TYPE_CHECKING:
    from .groups.backends.postgres import HistorySQL

#: Broadcast URL schemes whose servers LISTEN on PostgreSQL.
POSTGRES_SCHEMES = ("postgres", "postgresql")


class NotInTransaction(ValueError):
    """The connection would commit each statement by itself: there is no transaction to join."""


class Driver(enum.Enum):
    """The kinds of connection a transactional publish runs on."""

    PSYCOPG = "psycopg"
    PSYCOPG_ASYNC = "psycopg async"
    ASYNCPG = "asyncpg"
    SQLALCHEMY = "SQLAlchemy"
    SQLALCHEMY_ASYNC = "SQLAlchemy async"

    @property
    def is_async(self) -> bool:
        return self in (Driver.PSYCOPG_ASYNC, Driver.ASYNCPG, Driver.SQLALCHEMY_ASYNC)


@dataclasses.dataclass(frozen=True)
class Detected:
    """What `detect` found: the driver, and the object statements run on (a psycopg
    transaction's connection; a SQLAlchemy session or connection as given)."""

    driver: Driver
    target: object
    #: A SQLAlchemy session (its `connection()` is asked for), not a connection.
    session: bool = False


# -- what is used of each driver (none ships types that may be relied on being installed) ----


class _PsycopgInfo(Protocol):
    @property
    def transaction_status(self) -> int: ...


class _PsycopgCursor(Protocol):
    def execute(self, query: str, params: Any) -> object: ...
    def fetchone(self) -> Sequence[Any] | None: ...
    def close(self) -> None: ...


class _PsycopgConnection(Protocol):
    @property
    def autocommit(self) -> bool: ...
    @property
    def info(self) -> _PsycopgInfo: ...
    def cursor(self, *, row_factory: Any) -> _PsycopgCursor: ...


class _PsycopgAsyncCursor(Protocol):
    async def execute(self, query: str, params: Any) -> object: ...
    async def fetchone(self) -> Sequence[Any] | None: ...
    async def close(self) -> None: ...


class _PsycopgAsyncConnection(Protocol):
    @property
    def autocommit(self) -> bool: ...
    @property
    def info(self) -> _PsycopgInfo: ...
    def cursor(self, *, row_factory: Any) -> _PsycopgAsyncCursor: ...


class _AsyncpgConnection(Protocol):
    def is_in_transaction(self) -> bool: ...
    async def fetchrow(self, query: str, *args: Any) -> Sequence[Any] | None: ...
    async def execute(self, query: str, *args: Any) -> str: ...


class _SqlAlchemyResult(Protocol):
    def one(self) -> Sequence[Any]: ...


class _SqlAlchemyDialect(Protocol):
    name: str


class _SqlAlchemyPooled(Protocol):
    @property
    def dbapi_connection(self) -> object: ...


class _SqlAlchemyConnection(Protocol):
    @property
    def dialect(self) -> _SqlAlchemyDialect: ...
    @property
    def connection(self) -> _SqlAlchemyPooled: ...
    def execute(self, statement: Any, parameters: Mapping[str, Any]) -> _SqlAlchemyResult: ...


class _SqlAlchemySession(Protocol):
    def connection(self) -> _SqlAlchemyConnection: ...


class _SqlAlchemyAsyncConnection(Protocol):
    @property
    def sync_connection(self) -> _SqlAlchemyConnection | None: ...
    async def execute(self, statement: Any, parameters: Mapping[str, Any]) -> _SqlAlchemyResult: ...


class _SqlAlchemyAsyncSession(Protocol):
    async def connection(self) -> _SqlAlchemyAsyncConnection: ...


# -- recognising the caller's object ----------------------------------------------------------------


def _names(value: object, package: str) -> set[str]:
    """The names of the classes of `value` (its own and its bases) defined in `package`."""
    return {cls.__name__ for cls in type(value).__mro__ if cls.__module__.partition(".")[0] == package}


def _package(value: object) -> str:
    for cls in type(value).__mro__:
        package = cls.__module__.partition(".")[0]
        if package in ("psycopg", "asyncpg", "sqlalchemy", "psycopg2", "psycopg_pool"):
            return package
    return ""


def _unsupported(value: object, why: str = "") -> TypeError:
    kind = f"{type(value).__module__}.{type(value).__qualname__}"
    return TypeError(
        f"connection= takes a psycopg 3 Connection/AsyncConnection (or its transaction()), an asyncpg "
        f"Connection, or a SQLAlchemy Session/AsyncSession/Connection/AsyncConnection on PostgreSQL; "
        f"got {kind}{': ' + why if why else ''}"
    )


def detect(connection: object) -> Detected:
    """The driver of `connection`, from the modules its classes come from (nothing is imported);
    `TypeError` for anything else."""
    package = _package(connection)
    names = _names(connection, package) if package else set()
    if package == "psycopg":
        if names & {"Transaction", "AsyncTransaction"}:
            # A transaction block's statements run on its connection, inside the block.
            return detect(cast(Any, connection).connection)
        if "AsyncConnection" in names:
            return Detected(Driver.PSYCOPG_ASYNC, connection)
        if "Connection" in names:
            return Detected(Driver.PSYCOPG, connection)
    elif package == "asyncpg":
        if names & {"Connection", "PoolConnectionProxy"}:
            return Detected(Driver.ASYNCPG, connection)
        if "Transaction" in names:
            raise _unsupported(connection, "pass the connection, inside `async with connection.transaction()`")
        if "Pool" in names:
            raise _unsupported(connection, "a pool is no transaction: pass a connection acquired from it")
    elif package == "sqlalchemy":
        if names & {"AsyncSession", "async_scoped_session"}:
            return Detected(Driver.SQLALCHEMY_ASYNC, connection, session=True)
        if "AsyncConnection" in names:
            return Detected(Driver.SQLALCHEMY_ASYNC, connection)
        if names & {"Session", "scoped_session"}:
            return Detected(Driver.SQLALCHEMY, connection, session=True)
        if "Connection" in names:
            return Detected(Driver.SQLALCHEMY, connection)
        if names & {"Engine", "AsyncEngine"}:
            raise _unsupported(connection, "an engine is no transaction: pass a Session or a Connection")
    elif package == "psycopg2":
        raise _unsupported(connection, "psycopg2 is not supported directly: use psycopg 3, or a SQLAlchemy session")
    elif package == "psycopg_pool":
        raise _unsupported(connection, "a pool is no transaction: pass a connection from `pool.connection()`")
    raise _unsupported(connection)


# -- the statements, in each driver's parameter style -------------------------------------------------

_DOLLAR = re.compile(r"\$(\d+)")


@functools.cache
def _sql() -> HistorySQL:
    # The backend's module imports asyncpg: imported on first use, so that importing this
    # module needs no database driver.
    from .groups.backends.postgres import DEFAULT_TABLE, HistorySQL

    return HistorySQL(DEFAULT_TABLE)


@functools.cache
def _pyformat(statement: str) -> str:
    """`$n` as psycopg's `%(pn)s` (a name may repeat, as `$1` does)."""
    return _DOLLAR.sub(r"%(p\1)s", statement)


@functools.cache
def _text(statement: str) -> Any:
    """`$n` as a SQLAlchemy `text()` bind `:pn`, in parentheses: `:p1::text` would read as a
    bind named `p` followed by `1::text`."""
    from sqlalchemy import text

    return text(_DOLLAR.sub(r"(:p\1)", statement))


def _named(args: Sequence[object]) -> dict[str, object]:
    return {f"p{number}": value for number, value in enumerate(args, 1)}


def _for_cursor(cursor: object, statement: str, args: Sequence[object]) -> tuple[str, Any]:
    """A statement and its parameters as the cursor takes them: `%(pn)s` by name, unless the
    app's `cursor_factory` is a raw cursor, which takes the backend's `$n` as they are."""
    if "RawCursorMixin" in _names(cursor, "psycopg"):
        return statement, list(args)
    return _pyformat(statement), _named(args)


def _position(row: Sequence[Any] | None) -> Position:
    # The publish statement returns one row: epoch, seq (and pg_notify's void).
    if row is None:
        raise RuntimeError("the publish statement returned no row")
    return Position(str(row[0]), int(row[1]))


@functools.cache
def _tuple_row() -> Any:
    # Rows as tuples whatever row factory the app gave its connection (dict_row, class_row...).
    return importlib.import_module("psycopg.rows").tuple_row


# -- checks before anything is written ------------------------------------------------------------------


def check_settings(settings: Settings) -> None:
    """`ConfigurationError` (a `ValueError`) unless the servers listen on PostgreSQL."""
    scheme = urlsplit(settings.broadcast_url).scheme
    if scheme not in POSTGRES_SCHEMES:
        # The scheme only: the URL may hold a password.
        raise ConfigurationError(
            f"publishing in a database transaction needs the servers to listen on PostgreSQL "
            f"(DREAM_WS_BROADCAST_URL=postgresql://... on the database of the connection), but the "
            f"broadcast URL is {scheme}://: a NOTIFY committed there reaches no server. Publish "
            f"without connection= after the commit instead."
        )


def _prepared(group: str, message: Mapping[str, Any], settings: Settings) -> str:
    check_group(group)
    text = encode(check_event(message))
    check_settings(settings)
    from .groups.backends.postgres import check_publish

    check_publish(group, text)
    return text


def _check_psycopg(connection: _PsycopgConnection | _PsycopgAsyncConnection) -> None:
    # IDLE with autocommit: each statement would commit at once. Without autocommit psycopg
    # opens the transaction with the first statement, and the caller's commit() ends it.
    if connection.autocommit and int(connection.info.transaction_status) == 0:
        raise NotInTransaction(
            "the psycopg connection is in autocommit mode outside a transaction block: "
            "publish inside `with connection.transaction():`, or without autocommit"
        )


def _check_asyncpg(connection: _AsyncpgConnection) -> None:
    if not connection.is_in_transaction():
        raise NotInTransaction(
            "the asyncpg connection is not in a transaction (asyncpg commits each statement "
            "otherwise): publish inside `async with connection.transaction():`"
        )


def _check_sqlalchemy(connection: _SqlAlchemyConnection) -> None:
    if connection.dialect.name != "postgresql":
        raise TypeError(f"a SQLAlchemy connection to PostgreSQL is needed, not to {connection.dialect.name}")
    # SQLAlchemy begins a transaction by itself (autobegin) unless the driver connection is
    # in autocommit (isolation_level="AUTOCOMMIT"): then each statement would commit at once.
    if getattr(connection.connection.dbapi_connection, "autocommit", False):
        raise NotInTransaction(
            "the SQLAlchemy connection runs with isolation_level='AUTOCOMMIT': "
            "there is no transaction for the update to join"
        )


def _mismatch(driver: Driver, asynchronous: bool) -> TypeError:
    if asynchronous:
        return TypeError(f"a sync {driver.value} connection: call the sync form (publish / send_image_update)")
    return TypeError(f"an async {driver.value} connection: await the async form (apublish / asend_image_update)")


# -- publishing -------------------------------------------------------------------------------------


def publish_in_transaction(
    connection: object, group: str, message: Mapping[str, Any], *, settings: Settings
) -> Position:
    """Write `message` to `group` inside the transaction of a sync `connection`: it reaches
    browsers when that transaction commits, never if it rolls back. Returns the position it
    takes (final once committed).

    `ValueError`/`TypeError` for a bad group or message, a backend other than PostgreSQL
    (`ConfigurationError`), an unsupported or async connection, or one outside a transaction
    (`NotInTransaction`), all before anything is written. The driver's errors pass through.
    """
    text = _prepared(group, message, settings)
    detected = detect(connection)
    if detected.driver.is_async:
        raise _mismatch(detected.driver, asynchronous=False)
    sql = _sql()
    args = sql.publish_args(group, text, settings.state_ttl)
    if detected.driver is Driver.PSYCOPG:
        psycopg = cast(_PsycopgConnection, detected.target)
        _check_psycopg(psycopg)
        cursor = psycopg.cursor(row_factory=_tuple_row())
        try:
            cursor.execute(*_for_cursor(cursor, sql.publish, args))
            position = _position(cursor.fetchone())
            trim = sql.trim_args(group, position, settings.history_size)
            cursor.execute(*_for_cursor(cursor, sql.trim, trim))
        finally:
            cursor.close()
        return position
    if detected.session:
        alchemy = cast(_SqlAlchemySession, detected.target).connection()
    else:
        alchemy = cast(_SqlAlchemyConnection, detected.target)
    _check_sqlalchemy(alchemy)
    position = _position(alchemy.execute(_text(sql.publish), _named(args)).one())
    alchemy.execute(_text(sql.trim), _named(sql.trim_args(group, position, settings.history_size)))
    return position


async def apublish_in_transaction(
    connection: object, group: str, message: Mapping[str, Any], *, settings: Settings
) -> Position:
    """`publish_in_transaction` for an async `connection` (psycopg `AsyncConnection`, asyncpg,
    SQLAlchemy `AsyncSession`/`AsyncConnection`), on the running loop."""
    text = _prepared(group, message, settings)
    detected = detect(connection)
    if not detected.driver.is_async:
        raise _mismatch(detected.driver, asynchronous=True)
    sql = _sql()
    args = sql.publish_args(group, text, settings.state_ttl)
    if detected.driver is Driver.ASYNCPG:
        asyncpg = cast(_AsyncpgConnection, detected.target)
        _check_asyncpg(asyncpg)
        position = _position(await asyncpg.fetchrow(sql.publish, *args))
        await asyncpg.execute(sql.trim, *sql.trim_args(group, position, settings.history_size))
        return position
    if detected.driver is Driver.PSYCOPG_ASYNC:
        psycopg = cast(_PsycopgAsyncConnection, detected.target)
        _check_psycopg(psycopg)
        cursor = psycopg.cursor(row_factory=_tuple_row())
        try:
            await cursor.execute(*_for_cursor(cursor, sql.publish, args))
            position = _position(await cursor.fetchone())
            trim = sql.trim_args(group, position, settings.history_size)
            await cursor.execute(*_for_cursor(cursor, sql.trim, trim))
        finally:
            await cursor.close()
        return position
    if detected.session:
        alchemy = await cast(_SqlAlchemyAsyncSession, detected.target).connection()
    else:
        alchemy = cast(_SqlAlchemyAsyncConnection, detected.target)
    sync_connection = alchemy.sync_connection
    if sync_connection is None:
        raise TypeError("the SQLAlchemy AsyncConnection is not started: use it inside `async with`")
    _check_sqlalchemy(sync_connection)
    position = _position((await alchemy.execute(_text(sql.publish), _named(args))).one())
    await alchemy.execute(_text(sql.trim), _named(sql.trim_args(group, position, settings.history_size)))
    return position
