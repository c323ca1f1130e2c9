"""The PostgreSQL backend for `postgres://` / `postgresql://` URLs: groups on LISTEN/NOTIFY, with a history table.

broadcaster 0.3.1's Postgres backend waits forever in `next_published` once its connection is
gone (nothing watches for the end of the connection), buffers in an unbounded queue, and runs
LISTEN and every publish on one connection, where asyncpg refuses concurrent commands
("another operation is in progress"). This one listens on a connection of its own, raises
`BackendConnectionLost` when that connection ends (so that the layer reconnects and subscribes
again), bounds its buffer, and publishes through a small pool.

NOTIFY delivers at most once, like Redis pub/sub: what is published while a listener is
reconnecting is gone. So, as the Redis backend does with a stream, each publish also inserts
the message into a history table in the same transaction, and the notification carries the
row's id, which is the message's position: after a reconnect the layer reads what it missed
(`history`), and the newest row is the group's latest state (`latest`).

Needs the `postgres` extra (asyncpg). Not through PgBouncer in transaction mode: LISTEN needs a
session of its own.
"""

# asyncpg ships no type information; its names are `Any` here, which is all we need of them.
# mypy: disable-error-code="import-untyped"

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from typing import Any

import asyncpg

from ..contract import BackendConnectionLost, Position, Published, split_position

#: NOTIFY refuses a payload of 8000 bytes or more (BLCKSZ - NAMEDATALEN - 128 in a default build).
MAX_PAYLOAD_BYTES = 7999
#: The largest message: the payload also carries the history id (up to 19 digits) and a space.
MAX_MESSAGE_BYTES = MAX_PAYLOAD_BYTES - 20
#: Channels are identifiers: LISTEN silently truncates a longer one, pg_notify refuses it.
MAX_CHANNEL_BYTES = 63
#: Seconds to open a connection (asyncpg's default is 60, far too long for a reconnect loop).
CONNECT_TIMEOUT = 5.0
#: Seconds a clean close may take before the connections are dropped.
CLOSE_TIMEOUT = 2.0
#: Notifications buffered for a reader that is behind; past it the connection counts as lost,
#: as Redis drops a subscriber whose output buffer overflows.
MAX_PENDING = 10_000
#: A listening connection idle this long is probed (asyncpg sets no TCP keepalive, so a
#: half-open connection would otherwise never be noticed), with this timeout.
IDLE_CHECK_INTERVAL = 30.0
IDLE_CHECK_TIMEOUT = 5.0
#: Connections per pool (publishing and history; latest state).
POOL_SIZE = 10
#: Expired rows deleted per write: enough to keep up, little enough to stay cheap.
PURGE_BATCH = 100


class PayloadTooLarge(ValueError):
    """A message longer than NOTIFY carries; a ValueError, so the layer does not retry it."""


def row_position(row_id: str) -> Position:
    """A history row id (digits only) as a position; `ValueError` if it is not one."""
    if not (row_id.isascii() and row_id.isdigit()):
        raise ValueError(row_id)
    return (int(row_id),)


def check_channel(channel: str) -> None:
    """Refuse channel names PostgreSQL would refuse or silently truncate (we quote, so case is kept)."""
    size = len(channel.encode())
    if not 0 < size <= MAX_CHANNEL_BYTES or "\x00" in channel:
        raise ValueError(f"a PostgreSQL channel name must be 1 to {MAX_CHANNEL_BYTES} bytes without NUL: {channel!r}")


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def create_table_sql(table: str, columns: str) -> str:
    """A script creating `table` and its expiry index, safe to run from many processes at once.

    CREATE ... IF NOT EXISTS is not atomic: two processes creating the same table can fail
    (duplicate type or key). So creators take turns on an advisory lock held to the end of
    the script's implicit transaction; the next one then finds the table there.
    """
    return (
        f"SELECT pg_advisory_xact_lock(hashtextextended({_literal('starlette_dream_ws:' + table)}, 0));"
        f" CREATE TABLE IF NOT EXISTS {quote_ident(table)} ({columns});"
        f" CREATE INDEX IF NOT EXISTS {quote_ident(table + '_expires_at')} ON {quote_ident(table)} (expires_at)"
    )


async def _create_pool(url: str) -> Any:
    """A pool that connects on demand. With a minimum size, asyncpg (0.32) restores the minimum
    in the background after an outage, logging a traceback for every failed attempt."""
    return await asyncpg.create_pool(url, min_size=0, max_size=POOL_SIZE, timeout=CONNECT_TIMEOUT)


async def _close_pool(pool: Any) -> None:
    """Close a pool, dropping its connections if that does not finish in time (a dead server)."""
    try:
        async with asyncio.timeout(CLOSE_TIMEOUT):
            await pool.close()
    except Exception:
        pool.terminate()
        raise


class PostgresBackend:
    """Groups on LISTEN/NOTIFY: one listening connection; publishing and history through a pool."""

    def __init__(
        self,
        url: str,
        *,
        ttl: float = 86400.0,
        history_size: int = 100,
        table: str = "dream_ws_history",
        max_pending: int = MAX_PENDING,
        idle_check_interval: float = IDLE_CHECK_INTERVAL,
        idle_check_timeout: float = IDLE_CHECK_TIMEOUT,
    ) -> None:
        self._url = url
        self._ttl = float(ttl)
        self._history_size = history_size
        self._max_pending = max_pending
        self._idle_check_interval = idle_check_interval
        self._idle_check_timeout = idle_check_timeout
        self._listener: Any = None
        self._pool: Any = None
        self._events: deque[Published] = deque()
        self._arrived = asyncio.Event()
        self._lost: BackendConnectionLost | None = None
        # asyncpg runs one command at a time per connection: LISTEN, UNLISTEN and the probe take turns.
        self._lock = asyncio.Lock()
        self._sql = _HistorySQL(table)

    async def connect(self) -> None:
        # On failure the layer calls disconnect(), which closes whatever was opened.
        self._listener = await asyncpg.connect(self._url, timeout=CONNECT_TIMEOUT)
        self._listener.add_termination_listener(self._on_termination)
        self._pool = await _create_pool(self._url)
        await self._pool.execute(self._sql.create)

    async def disconnect(self) -> None:
        self._lose("the backend was disconnected")
        listener, self._listener = self._listener, None
        pool, self._pool = self._pool, None
        try:
            if listener is not None:
                await listener.close(timeout=CLOSE_TIMEOUT)  # aborts the connection if that fails
        finally:
            if pool is not None:
                await _close_pool(pool)

    async def subscribe(self, channels: Sequence[str]) -> None:
        # LISTEN takes effect when it returns (autocommit): every later NOTIFY reaches us.
        for channel in channels:
            check_channel(channel)
        async with self._lock:
            for channel in channels:
                await self._listening().add_listener(channel, self._on_notification)

    async def unsubscribe(self, channels: Sequence[str]) -> None:
        async with self._lock:
            for channel in channels:
                await self._listening().remove_listener(channel, self._on_notification)

    async def publish(self, channel: str, text: str) -> None:
        if not isinstance(text, str):
            raise TypeError(f"a PostgreSQL notification is text, not {type(text).__name__}")
        check_channel(channel)
        size = len(text.encode())
        if size > MAX_MESSAGE_BYTES:
            raise PayloadTooLarge(
                f"a message of {size} bytes does not fit in a PostgreSQL notification "
                f"(at most {MAX_MESSAGE_BYTES} bytes): send a reference to the data instead"
            )
        if "\x00" in text:
            raise ValueError("PostgreSQL text cannot hold NUL characters")
        async with self._pooled().acquire() as connection, connection.transaction():
            # One publisher per group at a time, so that ids grow in commit order, which is the
            # order NOTIFY delivers in: the layer drops an id lower than one it has delivered.
            await connection.execute(self._sql.lock, channel)
            await connection.execute(self._sql.publish, channel, text, self._ttl)
            await connection.execute(self._sql.trim, channel, self._history_size)
            await connection.execute(self._sql.purge)

    async def next_published(self) -> Published:
        while not self._events:
            # What arrived before the connection ended is delivered first, then the loss is raised.
            if self._lost is not None:
                raise self._lost
            self._arrived.clear()
            try:
                async with asyncio.timeout(self._idle_check_interval):
                    await self._arrived.wait()
            except TimeoutError:
                await self._probe()
        return self._events.popleft()

    # -- history ----------------------------------------------------------------------------

    async def history(self, channel: str, after: Position | None) -> list[Published]:
        """Messages of `channel` later than `after`, oldest first (at most `history_size`)."""
        start = after[0] if after is not None else 0
        rows = await self._pooled().fetch(self._sql.history, channel, start, self._history_size)
        return [Published(channel, row["message"], (row["id"],)) for row in rows]

    async def last_positions(self, channels: Sequence[str]) -> list[Position | None]:
        """The position of each channel's newest kept message, in one query."""
        rows = await self._pooled().fetch(self._sql.last_ids, list(channels))
        newest = {row["grp"]: row["id"] for row in rows}
        return [(newest[channel],) if channel in newest else None for channel in channels]

    async def latest(self, channel: str) -> str | None:
        """The newest message of `channel` (its latest state), if any is kept."""
        value = await self._pooled().fetchval(self._sql.latest, channel)
        return value if isinstance(value, str) else None

    # -- internals --------------------------------------------------------------------------

    def _listening(self) -> Any:
        if self._lost is not None:
            raise self._lost
        if self._listener is None:
            raise BackendConnectionLost("connect() first")
        return self._listener

    def _pooled(self) -> Any:
        if self._pool is None:
            raise BackendConnectionLost("connect() first")
        return self._pool

    async def _probe(self) -> None:
        try:
            async with self._lock, asyncio.timeout(self._idle_check_timeout):
                await self._listening().execute("SELECT 1")
        except BackendConnectionLost:
            raise
        except Exception as exc:
            self._lose(f"the listening connection does not answer ({type(exc).__name__})")
            if self._listener is not None:
                self._listener.terminate()
            raise BackendConnectionLost(f"PostgreSQL does not answer: {type(exc).__name__}") from exc

    def _on_notification(self, connection: Any, pid: int, channel: str, payload: str) -> None:
        if self._lost is not None:
            return
        if len(self._events) >= self._max_pending:
            self._lose(f"more than {self._max_pending} notifications waiting: the reader fell behind")
            # Stop the server from sending more; the reader drains what is buffered, then reconnects.
            connection.terminate()
            return
        position, text = split_position(payload, row_position)
        self._events.append(Published(channel, text, position))
        self._arrived.set()

    def _on_termination(self, connection: Any) -> None:
        # asyncpg calls this with call_soon after the notifications that arrived before the end.
        self._lose("the PostgreSQL connection was closed")

    def _lose(self, reason: str) -> None:
        if self._lost is None:
            self._lost = BackendConnectionLost(reason)
        self._arrived.set()


class _HistorySQL:
    """The statements of `PostgresBackend` on one history table."""

    def __init__(self, table: str) -> None:
        t = quote_ident(table)
        self.create = create_table_sql(
            table,
            "grp text NOT NULL, id bigint NOT NULL, message text NOT NULL, expires_at timestamptz NOT NULL,"
            " PRIMARY KEY (grp, id)",
        )
        # Taken before the insert, in a statement of its own: the insert's snapshot must see the
        # row of the publisher that held the lock before us.
        self.lock = f"SELECT pg_advisory_xact_lock(hashtextextended({_literal(table)} || ':' || $1::text, 0))"
        # Ids are microseconds since the epoch, or one more than the group's newest: they keep
        # growing when the table is emptied, as Redis stream ids do.
        self.publish = (
            f"WITH new AS (INSERT INTO {t} (grp, id, message, expires_at)"
            " SELECT $1::text,"
            " greatest(floor(extract(epoch FROM clock_timestamp()) * 1000000)::bigint, coalesce(max(id), 0) + 1),"
            " $2::text, now() + make_interval(secs => $3::float8)"
            f" FROM {t} WHERE grp = $1::text RETURNING id)"
            " SELECT pg_notify($1::text, id || ' ' || $2::text) FROM new"
        )
        # Keep the group's newest `history_size` rows.
        self.trim = (
            f"DELETE FROM {t} WHERE grp = $1::text AND id < "
            f"(SELECT id FROM {t} WHERE grp = $1::text ORDER BY id DESC OFFSET $2::int - 1 LIMIT 1)"
        )
        self.purge = (
            f"DELETE FROM {t} WHERE (grp, id) IN "
            f"(SELECT grp, id FROM {t} WHERE expires_at <= now() LIMIT {PURGE_BATCH})"
        )
        alive = "grp = $1::text AND expires_at > now()"
        self.history = f"SELECT id, message FROM {t} WHERE {alive} AND id > $2::bigint ORDER BY id LIMIT $3::int"
        self.last_ids = (
            f"SELECT grp, max(id) AS id FROM {t} WHERE grp = ANY($1::text[]) AND expires_at > now() GROUP BY grp"
        )
        self.latest = f"SELECT message FROM {t} WHERE {alive} ORDER BY id DESC LIMIT 1"
