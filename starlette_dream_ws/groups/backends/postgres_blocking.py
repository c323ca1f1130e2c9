"""Publishing to `postgresql://` from sync code (a Celery task, a thread) with psycopg, no event loop.

asyncpg has no sync API, so without this a sync update goes through the process's background
loop: a hop there and back per update, which costs more than the database work. This runs the
backend's own statements (`HistorySQL`: the position upsert with its NOTIFY, the trim, the
purge) in one transaction on a psycopg connection of the calling thread, in pipeline mode (the
statements go out together). Used when psycopg is installed (the `postgres` extra brings it).
"""

from __future__ import annotations

from typing import Any

import psycopg

from ...protocol import Position
from ...settings import Settings
from ..publishing import PublishMetrics
from .per_thread import PerThread
from .postgres import CONNECT_TIMEOUT, DEFAULT_TABLE, HistorySQL, check_publish


class BlockingPostgresPublisher:
    """Publishes on one PostgreSQL URL from any thread of this process; `close()` ends every connection."""

    def __init__(self, settings: Settings) -> None:
        self._url = settings.broadcast_url
        self._ttl = float(settings.state_ttl)
        self._history_size = settings.history_size
        self._timeout_ms = max(1, int(settings.publish_timeout * 1000))
        self._sql = HistorySQL(DEFAULT_TABLE)
        self._connections: PerThread[psycopg.Connection[Any]] = PerThread(self._connect, _close)
        self.pid = self._connections.pid
        self.metrics = PublishMetrics()

    def publish(self, channel: str, text: str) -> Position:
        """One attempt in one transaction: the update's position, or the error (the caller retries)."""
        check_publish(channel, text)
        connection = self._connections.get()
        sql = self._sql
        try:
            with connection.pipeline(), connection.transaction():
                cursor = connection.execute(sql.publish, sql.publish_args(channel, text, self._ttl))
                # Before the trim and the purge are queued: `fetchone` sends what waits and reads.
                row = cursor.fetchone()
                if row is None:
                    raise RuntimeError("the publish statement returned no row")
                position = Position(str(row[0]), int(row[1]))
                connection.execute(sql.trim, sql.trim_args(channel, position, self._history_size))
                for statement in sql.purge_statements:
                    connection.execute(statement)
        except Exception:
            # A connection in an unknown state (a timeout mid-statement): the next attempt makes a new one.
            self._connections.drop(connection)
            raise
        return position

    def _connect(self) -> psycopg.Connection[Any]:
        # Raw cursors take the backend's `$n` statements as they are; the statement timeout
        # bounds one attempt as `publish_timeout` does on the other paths.
        return psycopg.Connection.connect(
            self._url,
            cursor_factory=psycopg.RawCursor,
            connect_timeout=max(1, int(CONNECT_TIMEOUT)),
            options=f"-c statement_timeout={self._timeout_ms}",
        )

    def close(self) -> None:
        """Close the connections of every thread (in the process that made them)."""
        self._connections.close_all()


def _close(connection: psycopg.Connection[Any]) -> None:
    connection.close()
