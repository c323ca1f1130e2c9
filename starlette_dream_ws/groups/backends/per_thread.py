"""One connection per thread for the sync publishers, and closing them all at the end.

Threads of a worker publish side by side without a lock around one shared connection; a thread
may be gone when the process closes its producers, so every connection is also kept in a list.
A forked child (Celery's prefork pool) makes its own: closing the parent's copies from the
child would end the parent's sessions.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

C = TypeVar("C")


class PerThread(Generic[C]):
    """The connections `connect()` makes, one per thread of the process that made this."""

    def __init__(self, connect: Callable[[], C], close: Callable[[C], object]) -> None:
        self._connect = connect
        self._close = close
        self._local = threading.local()
        self._lock = threading.Lock()
        self._all: list[C] = []
        self.pid = os.getpid()

    def get(self) -> C:
        """This thread's connection, made on first use (or after `drop`)."""
        connection: C | None = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._local.connection = self._connect()
            with self._lock:
                self._all.append(connection)
        return connection

    def drop(self, connection: C) -> None:
        """Close this thread's connection (its state is unknown after an error): the next
        `get()` makes a new one."""
        self._local.connection = None
        with self._lock:
            if connection in self._all:
                self._all.remove(connection)
        self._close(connection)

    def close_all(self) -> None:
        """Close every thread's connection (in the process that made them)."""
        with self._lock:
            connections, self._all = self._all, []
        self._local = threading.local()
        if os.getpid() == self.pid:
            for connection in connections:
                self._close(connection)
