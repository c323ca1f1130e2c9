"""The PostgreSQL backend for `postgres://` / `postgresql://` URLs: groups on LISTEN/NOTIFY, with history.

broadcaster 0.3.1's Postgres backend waits forever in `next_published` once its connection is
gone (nothing watches for the end of the connection), buffers in an unbounded queue, and runs
LISTEN and every publish on one connection, where asyncpg refuses concurrent commands
("another operation is in progress"). This one listens on a connection of its own, raises
`BackendConnectionLost` when that connection ends (so that the layer reconnects and subscribes
again), bounds its buffer, and publishes through a small pool.

NOTIFY delivers at most once, like Redis pub/sub: what is published while a listener is
reconnecting is gone. So, as the Redis backend does with a stream, each publish takes the
group's next position (a row per group: epoch and seq) and inserts the message into a
messages table in the same transaction, and the notification carries the position: after a
reconnect the layer reads what it missed (`history`), and the newest row is the group's latest
state (`latest`).

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

from ...protocol import Position, new_epoch
from ..contract import BackendConnectionLost, History, Published, split_position

#: The messages table (its positions table is `<table>_positions`) when none is named.
DEFAULT_TABLE = "dream_ws_messages"

#: NOTIFY refuses a payload of 8000 bytes or more (BLCKSZ - NAMEDATALEN - 128 in a default build).
MAX_PAYLOAD_BYTES = 7999
#: The largest message: the payload also carries its position (`<epoch>:<seq> `, at most 50 bytes).
MAX_MESSAGE_BYTES = MAX_PAYLOAD_BYTES - 50
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


def check_channel(channel: str) -> None:
    """Refuse channel names PostgreSQL would refuse or silently truncate (we quote, so case is kept)."""
    size = len(channel.encode())
    if not 0 < size <= MAX_CHANNEL_BYTES or "\x00" in channel:
        raise ValueError(f"a PostgreSQL channel name must be 1 to {MAX_CHANNEL_BYTES} bytes without NUL: {channel!r}")


def check_publish(channel: str, text: str) -> None:
    """Refuse what a publish could not carry, before anything is written: a channel name
    PostgreSQL refuses, a message over `MAX_MESSAGE_BYTES`, NUL characters."""
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
        table: str = DEFAULT_TABLE,
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
        self._sql = HistorySQL(table)

    async def connect(self) -> None:
        # On failure the layer calls disconnect(), which closes whatever was opened.
        self._listener = await asyncpg.connect(self._url, timeout=CONNECT_TIMEOUT)
        self._listener.add_termination_listener(self._on_termination)
        self._pool = await _create_pool(self._url)
        if not await self._pool.fetchval(self._sql.exists):
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

    async def publish(self, channel: str, text: str) -> Position:
        check_publish(channel, text)
        async with self._pooled().acquire() as connection, connection.transaction():
            row = await connection.fetchrow(self._sql.publish, *self._sql.publish_args(channel, text, self._ttl))
            position = Position(row["epoch"], row["seq"])
            await connection.execute(self._sql.trim, *self._sql.trim_args(channel, position, self._history_size))
            await connection.execute(self._sql.purge)
        return position

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

    async def history(self, channel: str, after: Position | None) -> History:
        """The current position and the kept messages after `after` (at most `history_size`)."""
        epoch, seq = (after.epoch, after.seq) if after is not None else ("", 0)
        rows = await self._pooled().fetch(self._sql.history, channel, epoch, seq, self._history_size)
        if not rows:
            return History((await self.positions([channel]))[0], [])
        current = Position(rows[0]["epoch"], rows[0]["seq"])
        messages = [
            Published(channel, row["message"], Position(current.epoch, row["message_seq"]))
            for row in rows
            if row["message_seq"] is not None
        ]
        return History(current, messages)

    async def positions(self, channels: Sequence[str]) -> list[Position]:
        """Each channel's current position, in one statement."""
        rows = await self._pooled().fetch(self._sql.positions, list(channels), new_epoch(), self._ttl, 0)
        found = {row["grp"]: Position(row["epoch"], row["seq"]) for row in rows}
        return [found[channel] for channel in channels]

    async def latest(self, channel: str) -> Published | None:
        """The newest message of `channel` (its latest state), if any is kept."""
        row = await self._pooled().fetchrow(self._sql.latest, channel)
        return None if row is None else Published(channel, row["message"], Position(row["epoch"], row["seq"]))

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
        position, text = split_position(payload)
        self._events.append(Published(channel, text, position))
        self._arrived.set()

    def _on_termination(self, connection: Any) -> None:
        # asyncpg calls this with call_soon after the notifications that arrived before the end.
        self._lose("the PostgreSQL connection was closed")

    def _lose(self, reason: str) -> None:
        if self._lost is None:
            self._lost = BackendConnectionLost(reason)
        self._arrived.set()


class HistorySQL:
    """The statements of `PostgresBackend` on one messages table and its positions table.

    Shared with `starlette_dream_ws.transactional`, which runs `publish` then `trim` on an
    app's own connection inside the app's transaction: the statements, and the order of their
    arguments (`publish_args`, `trim_args`), are written once, here. Parameters are `$n`.
    """

    def __init__(self, table: str) -> None:
        m, p = quote_ident(table), quote_ident(table + "_positions")
        self.create = (
            create_table_sql(
                table,
                "grp text NOT NULL, epoch text NOT NULL, seq bigint NOT NULL, message text NOT NULL,"
                " expires_at timestamptz NOT NULL, PRIMARY KEY (grp, seq)",
            )
            + "; "
            + create_table_sql(
                table + "_positions",
                "grp text PRIMARY KEY, epoch text NOT NULL, seq bigint NOT NULL, expires_at timestamptz NOT NULL",
            )
        )
        # Whether every table and index is there already: then `create` is not run at all, since
        # CREATE INDEX IF NOT EXISTS waits for every open writer of the table even when the
        # index exists (an app's transaction that has published, another server's publishes).
        names = (table, table + "_expires_at", table + "_positions", table + "_positions_expires_at")
        self.exists = "SELECT " + " AND ".join(f"to_regclass({_literal(quote_ident(n))}) IS NOT NULL" for n in names)
        expiry = "now() + make_interval(secs => $3::float8)"
        # A group's position: an expired one starts a new epoch (the one given, $2) from 0.
        # `$4` is added to seq: 1 to publish, 0 to read (and start an epoch if there is none).
        # The row lock it takes lasts to the end of the transaction, so publishers of a group
        # take turns and commit, hence notify, in seq order.
        upsert = (
            f"INSERT INTO {p} AS p (grp, epoch, seq, expires_at)"
            f" SELECT g, $2::text, $4::int, {expiry} FROM unnest($1::text[]) AS u(g) ORDER BY g"
            " ON CONFLICT (grp) DO UPDATE SET"
            " epoch = CASE WHEN p.expires_at > now() THEN p.epoch ELSE EXCLUDED.epoch END,"
            " seq = CASE WHEN p.expires_at > now() THEN p.seq + $4::int ELSE $4::int END,"
            " expires_at = CASE WHEN $4::int > 0 OR p.expires_at <= now() THEN EXCLUDED.expires_at"
            " ELSE p.expires_at END"
            " RETURNING p.grp, p.epoch, p.seq"
        )
        self.positions = upsert
        # $5: the message. Notified as "<epoch>:<seq> <message>". `$1` is cast where it is
        # subscripted: a driver that binds on the client side sends an untyped literal.
        self.publish = (
            f"WITH pos AS ({upsert}),"
            f" new AS (INSERT INTO {m} (grp, epoch, seq, message, expires_at)"
            f" SELECT grp, epoch, seq, $5::text, {expiry} FROM pos RETURNING epoch, seq)"
            " SELECT epoch, seq, pg_notify(($1::text[])[1], epoch || ':' || seq || ' ' || $5::text) FROM new"
        )
        # Keep the group's newest `history_size` rows of its current epoch.
        self.trim = f"DELETE FROM {m} WHERE grp = $1::text AND (epoch <> $2::text OR seq <= $3::bigint - $4::int)"
        #: Expired rows, a batch at a time (two statements: a pipeline runs them one by one).
        self.purge_statements = (
            f"DELETE FROM {m} WHERE (grp, seq) IN"
            f" (SELECT grp, seq FROM {m} WHERE expires_at <= now() LIMIT {PURGE_BATCH})",
            f"DELETE FROM {p} WHERE grp IN (SELECT grp FROM {p} WHERE expires_at <= now() LIMIT {PURGE_BATCH})",
        )
        self.purge = "; ".join(self.purge_statements)
        # One statement, so one snapshot: the position and the messages after $2:$3 agree.
        self.history = (
            "SELECT p.epoch, p.seq, m.seq AS message_seq, m.message"
            f" FROM {p} p LEFT JOIN LATERAL (SELECT seq, message FROM {m}"
            " WHERE grp = p.grp AND epoch = p.epoch AND expires_at > now()"
            " AND seq > CASE WHEN p.epoch = $2::text THEN $3::bigint ELSE 0 END ORDER BY seq LIMIT $4::int) m ON true"
            " WHERE p.grp = $1::text AND p.expires_at > now() ORDER BY m.seq"
        )
        self.latest = (
            f"SELECT m.epoch, m.seq, m.message FROM {p} p JOIN {m} m"
            " ON m.grp = p.grp AND m.epoch = p.epoch AND m.seq = p.seq"
            " WHERE p.grp = $1::text AND p.expires_at > now() AND m.expires_at > now()"
        )

    @staticmethod
    def publish_args(channel: str, text: str, ttl: float) -> tuple[list[str], str, float, int, str]:
        """The arguments of `publish`: the new epoch a group without a live one starts."""
        return [channel], new_epoch(), ttl, 1, text

    @staticmethod
    def trim_args(channel: str, position: Position, history_size: int) -> tuple[str, str, int, int]:
        """The arguments of `trim`, after a publish that got `position`."""
        return channel, position.epoch, position.seq, history_size
