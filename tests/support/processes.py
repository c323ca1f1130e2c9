"""Starting and stopping the processes of the tests (and of the benchmark), so that none outlives the run.

Every process started here is killed at interpreter exit if a test forgot to stop it, and on
Linux also when pytest itself dies (SIGKILL, a CI timeout): nothing outlives the run. Servers
that want a clean shutdown at exit instead (`close_at_exit`) are closed first.
Everything listens on 127.0.0.1 only, on ports picked by the kernel.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

if TYPE_CHECKING:
    import pytest

HOST = "127.0.0.1"
#: Seconds a process may take to become ready or to exit.
START_TIMEOUT = 15.0
STOP_TIMEOUT = 5.0
POLL_INTERVAL = 0.02

#: Processes started and not stopped yet: killed at exit.
_live: set[subprocess.Popen[bytes]] = set()
#: Servers not closed yet that asked to be closed at exit (stopped cleanly, files removed).
_unclosed: set[ServerProcess] = set()

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
def _clean_up_leftovers() -> None:
    try:
        # The servers first, while their processes still run: a clean shutdown, then their files go.
        for server in list(_unclosed):
            server.close()
    finally:
        for process in list(_live):
            if process.poll() is None:
                process.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(STOP_TIMEOUT)
        _live.clear()


def close_at_exit(server: ServerProcess) -> None:
    """Close `server` at exit if nobody did (a clean shutdown, its files removed) rather than only kill it."""
    _unclosed.add(server)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, read it back)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def port_open(port: int, timeout: float = 0.5) -> bool:
    """True when something accepts a TCP connection on 127.0.0.1:`port`."""
    try:
        with socket.create_connection((HOST, port), timeout=timeout):
            return True
    except OSError:
        return False


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without any `DREAM_WS_*` variable, plus `extra`."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("DREAM_WS_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def popen(args: Sequence[str], **options: Any) -> subprocess.Popen[bytes]:
    """`subprocess.Popen(args, **options)`, killed at exit (and with this process, on Linux) unless stopped."""
    process = subprocess.Popen(
        list(args),
        # Runs after a user switch (`user=` in `options`), which would clear it otherwise.
        preexec_fn=_preexec(),
        **options,
    )
    _live.add(process)
    return process


def spawn(
    args: Sequence[str], *, env: Mapping[str, str] | None, log: Path, cwd: Path | None = None, **options: Any
) -> subprocess.Popen[bytes]:
    """A server-like process: no stdin, stdout and stderr appended to `log`, in a session of its own.

    `options` go to `subprocess.Popen` (`user=`, `group=`, ...)."""
    with log.open("ab") as out:
        return popen(
            args,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            # Its own session: a Ctrl-C meant for pytest does not hit it before the fixtures do.
            start_new_session=True,
            **options,
        )


def stop_process(
    process: subprocess.Popen[bytes],
    *,
    kill: bool = False,
    timeout: float = STOP_TIMEOUT,
    stop_signal: int = signal.SIGTERM,
    kill_group: bool = False,
) -> None:
    """`stop_signal` (SIGTERM; SIGKILL when `kill`), wait at most `timeout`, then SIGKILL and wait.

    With `kill_group`, SIGKILL goes to the whole process group, the process's children too: for a
    process started in a session of its own (`spawn`), whose group is its own."""
    try:
        if process.poll() is None:
            if kill:
                _kill(process, kill_group)
            else:
                process.send_signal(stop_signal)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                _kill(process, kill_group)
                process.wait(timeout)
    finally:
        _live.discard(process)


def _kill(process: subprocess.Popen[bytes], group: bool) -> None:
    if group:
        os.killpg(process.pid, signal.SIGKILL)
    else:
        process.kill()


def resolve_workdir(given: Path | None, prefix: str) -> tuple[Path, bool]:
    """`(directory, owned)`: the given one (its owner cleans it, e.g. pytest's tmp_path), else a new one."""
    if given is not None:
        given.mkdir(parents=True, exist_ok=True)
        return given, False
    return Path(tempfile.mkdtemp(prefix=prefix)), True


def workdir(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """A directory for a process's files under pytest's base temp, which pytest rotates.

    Logs stay there for a post-mortem, also when pytest itself was killed."""
    return tmp_path_factory.mktemp(name)


class ServerProcess:
    """What every server shares: its process, a work directory with the log, and `with` support.

    `workdir` is where its files go (removed by its owner, e.g. pytest); without one, a temp
    directory of its own that `close()` removes."""

    def __init__(self, workdir: Path | None, *, prefix: str, log_name: str) -> None:
        self.workdir, self._own_workdir = resolve_workdir(workdir, prefix)
        self.log_path = self.workdir / log_name
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        """The server's process, once started (None before, and after a `stop()` that forgets it)."""
        return self._process

    @property
    def pid(self) -> int:
        """The pid of the server's process."""
        assert self._process is not None, "not started"
        return self._process.pid

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def returncode(self) -> int | None:
        return self._process.returncode if self._process is not None else None

    def start(self, timeout: float = START_TIMEOUT) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def close(self) -> None:
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        _unclosed.discard(self)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
