"""uvicorn in a process of its own: the servers of the integration and browser tests, and of the benchmark.

Readiness is always probed (the uvicorn log and an HTTP answer, or a listening port) against a
deadline, never assumed after a sleep.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from .processes import (
    HOST,
    POLL_INTERVAL,
    START_TIMEOUT,
    STOP_TIMEOUT,
    ServerProcess,
    clean_env,
    free_port,
    port_open,
    stop_process,
    workdir,
)
from .processes import spawn as spawn_process
from .tokens import JWT_SECRET

#: Where the integration tests' app lives (`served_app.py`), and the app served by default.
INTEGRATION_APP_DIR = Path(__file__).resolve().parents[1] / "integration"
APP = "served_app:app"

#: How `wait_ready()` knows the server is up: `"health"`, the log says it is running and
#: `/health` gives any HTTP answer (503 counts); `"port"`, it accepts TCP connections (for an
#: app without `/health`, or a log level that hides uvicorn's start-up line).
Readiness = Literal["health", "port"]


class UvicornServer(ServerProcess):
    """`python -m uvicorn APP` on 127.0.0.1 with its own environment and log file.

    `mount` is where the dream app sits in APP (`/ws` for a mounted one): `ws_url()` and
    `health()` prefix their paths with it. `options` are more uvicorn options, after the host,
    port and `--log-level`; `cwd` is the process's working directory (default: this one's).
    Other ASGI servers subclass it (`servers.py`): `name` and `command()` are what differ.
    """

    #: The server in file names and errors.
    name = "uvicorn"

    def __init__(
        self,
        env: Mapping[str, str],
        app: str = APP,
        *,
        mount: str = "",
        app_dir: Path = INTEGRATION_APP_DIR,
        workdir: Path | None = None,
        options: Sequence[str] = (),
        log_level: str = "info",
        ready_when: Readiness = "health",
        cwd: Path | None = None,
    ) -> None:
        self.app = app
        self.mount = mount
        self.app_dir = app_dir
        self.env = clean_env(env)
        self.options = list(options)
        self.log_level = log_level
        self.ready_when = ready_when
        self.cwd = cwd
        self.port = free_port()
        super().__init__(workdir, prefix=f"dream-ws-{self.name}-", log_name=f"{self.name}.log")

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def ws_url(self, path: str) -> str:
        return f"ws://{HOST}:{self.port}{self.mount}{path}"

    def spawn(self) -> None:
        """Start the process without waiting; `wait_ready()` waits (start several at once)."""
        if self.running:
            return
        self._process = spawn_process(self.command(), env=self.env, log=self.log_path, cwd=self.cwd)

    def command(self) -> list[str]:
        """The server's command line."""
        args = [sys.executable, "-m", "uvicorn", self.app, "--app-dir", str(self.app_dir)]
        return [*args, "--host", HOST, "--port", str(self.port), "--log-level", self.log_level, *self.options]

    def is_ready(self) -> bool:
        """Whether it is up, by `ready_when`."""
        if self.ready_when == "port":
            return port_open(self.port)
        return "Uvicorn running on" in self.log_text() and self.health(timeout=1.0) is not None

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Until `is_ready()`; an error with the log if the process exits or `timeout` passes first."""
        process = self._process
        assert process is not None, "spawn() first"
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {process.returncode}:\n{self.log_text()}")
            if self.is_ready():
                return
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} was not ready within {timeout}s:\n{self.log_text()}")
            time.sleep(POLL_INTERVAL)

    def start(self, timeout: float = START_TIMEOUT) -> None:
        self.spawn()
        self.wait_ready(timeout)

    def health(self, timeout: float = 2.0) -> tuple[int, dict[str, Any]] | None:
        """`(status code, JSON body)` of `GET /health`, or None when nothing answers."""
        try:
            with urllib.request.urlopen(f"{self.base_url}{self.mount}/health", timeout=timeout) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, json.loads(exc.read() or b"{}")
        except (OSError, ValueError):
            return None

    def wait_backend_connected(self, timeout: float = 10.0, *, connected: bool = True) -> dict[str, Any]:
        """Poll `/health` until it reports `backend_connected` as `connected`; returns that body."""
        deadline = time.monotonic() + timeout
        last: tuple[int, dict[str, Any]] | None = None
        while time.monotonic() < deadline:
            last = self.health(timeout=1.0)
            if last is not None and last[1].get("backend_connected") is connected:
                assert last[0] == (200 if connected else 503), last
                return last[1]
            time.sleep(POLL_INTERVAL * 2)
        raise AssertionError(f"backend_connected is not {connected} after {timeout}s; last /health: {last}")

    def wait_reconnected(self, reconnects_before: int, timeout: float = 15.0) -> dict[str, Any]:
        """Poll `/health` until the backend is connected again after a loss (its reconnect count
        is past `reconnects_before`); returns that body."""
        deadline = time.monotonic() + timeout
        while True:
            body = self.wait_backend_connected(max(0.1, deadline - time.monotonic()))
            if body["backend_reconnects"] > reconnects_before:
                return body
            if time.monotonic() >= deadline:
                raise AssertionError(f"no reconnect after {timeout}s; last /health: {body}")
            time.sleep(POLL_INTERVAL * 2)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM, a graceful shutdown (SIGKILL after `timeout`); `returncode` stays readable."""
        if self._process is not None:
            stop_process(self._process, timeout=timeout)

    def kill(self) -> None:
        """SIGKILL, as after a crash: no close frame, no shutdown. `start()` starts it again."""
        if self._process is not None:
            stop_process(self._process, kill=True)

    def shutdown_problems(self) -> list[str]:
        """After `stop()`: what went wrong in the server's life (an empty list when nothing did)."""
        log = self.log_text()
        problems = []
        # uvicorn re-raises the SIGTERM it handled, after a graceful shutdown.
        if self.returncode not in (0, -signal.SIGTERM):
            problems.append(f"exit status {self.returncode}")
        if "Application shutdown complete." not in log:
            problems.append("no graceful application shutdown")
        problems += [f"log: {line}" for line in log.splitlines() if "Traceback" in line or line.startswith("ERROR")]
        return problems


#: `start_server(app=..., env=...)` of the browser tests: a started server.
ServerFactory = Callable[..., UvicornServer]


def stop_and_check(servers: Iterable[UvicornServer]) -> list[str]:
    """Stop each server; what went wrong in their shutdowns, each with the end of its log."""
    problems: list[str] = []
    for server in servers:
        server.stop()
        found = server.shutdown_problems()
        if found:
            problems += [f"{server.base_url}: {problem}" for problem in found] + [server.log_text()[-4000:]]
    return problems


def start_all(servers: Iterable[UvicornServer]) -> None:
    """Start several servers side by side (their start-up times overlap)."""
    servers = list(servers)
    for server in servers:
        server.spawn()
    for server in servers:
        server.wait_ready()


@contextlib.contextmanager
def serving(*servers: UvicornServer) -> Iterator[None]:
    """Run the servers; afterwards stop them and fail if one did not shut down cleanly."""
    try:
        start_all(servers)
        yield
    finally:
        problems = stop_and_check(servers)
        for server in servers:
            server.close()
    assert not problems, "\n".join(problems)


def server_env(backend_url: str, **extra: str) -> dict[str, str]:
    """Groups on `backend_url` (Redis or PostgreSQL), and the tokens' secret."""
    return {"DREAM_WS_BROADCAST_URL": backend_url, "DREAM_WS_JWT_SECRET": JWT_SECRET, **extra}


@contextlib.contextmanager
def serving_pair(backend_url: str, tmp_path_factory: Any, name: str) -> Iterator[tuple[UvicornServer, UvicornServer]]:
    """Servers `<name>-a` and `<name>-b` on `backend_url`, running for the block (a module's own
    pair, beside a backend it may stop)."""
    env = server_env(backend_url)
    pair = (
        UvicornServer(env, workdir=workdir(tmp_path_factory, f"{name}-a")),
        UvicornServer(env, workdir=workdir(tmp_path_factory, f"{name}-b")),
    )
    with serving(*pair):
        yield pair


def servers_in(value: Any) -> list[UvicornServer]:
    """The servers in a fixture's value: a server, or a tuple or list of them (nested too)."""
    if isinstance(value, UvicornServer):
        return [value]
    if isinstance(value, tuple | list):
        return [server for item in value for server in servers_in(item)]
    return []
