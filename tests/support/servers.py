"""Every ASGI server the component is tested on, each in a process of its own: uvicorn (with its
two WebSocket stacks), Hypercorn, Granian and Daphne.

They are all `UvicornServer`s to the tests (same environment, app, mount, `ws_url()`, `health()`,
`stop()`); a server only differs in its command line, how it says it is ready, and what a clean
stop looks like. What a server cannot do is in `ServerTraits`, which the matrix tests read, so
that a known limit is asserted or marked as what it is rather than hidden.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import ClassVar, Literal

from .processes import HOST, port_open
from .uvicorn import APP, UvicornServer

ServerKind = Literal["uvicorn-websockets-sansio", "uvicorn-wsproto", "hypercorn", "granian", "daphne"]
SERVER_KINDS: tuple[ServerKind, ...] = (
    "uvicorn-websockets-sansio",
    "uvicorn-wsproto",
    "hypercorn",
    "granian",
    "daphne",
)


@dataclasses.dataclass(frozen=True)
class ServerTraits:
    """What a server does that the component cannot change (observed, and in docs/servers.md)."""

    #: The close code clients get on SIGTERM; None: the connection is dropped without a close frame.
    sigterm_close_code: int | None
    #: Whether it sends the protocol's close codes below 3000 but 1000 (1001, 1008, 1009, 1013);
    #: where it does not, the app closes with 1000 after its `error` message instead.
    standard_close_codes: bool = True
    #: Why, where one of the above is not what the protocol wants.
    note: str = ""


class AsgiServer(UvicornServer):
    """A server other than uvicorn, run like it: the served app, found on `app_dir` (put on
    `PYTHONPATH`, as none of them has uvicorn's `--app-dir`).

    Ready when the app gives any HTTP answer at `<mount>/health`: the log lines that say a
    server is listening differ, and some (Granian) listen before their worker has the app.
    """

    #: Exit statuses of a graceful stop after SIGTERM.
    clean_exits: ClassVar[frozenset[int]] = frozenset({0})

    def spawn(self) -> None:
        # First on the path, once however often it is started again.
        path = [str(self.app_dir), *self.env.get("PYTHONPATH", "").split(os.pathsep)]
        self.env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(filter(None, path)))
        super().spawn()

    def is_ready(self) -> bool:
        if self.ready_when == "port":
            return port_open(self.port)
        return self.health(timeout=1.0) is not None

    def shutdown_problems(self) -> list[str]:
        log = self.log_text()
        problems = []
        if self.returncode not in self.clean_exits:
            problems.append(f"exit status {self.returncode}")
        problems += [f"log: {line}" for line in log.splitlines() if "Traceback" in line]
        return problems


class HypercornServer(AsgiServer):
    """`hypercorn --workers 0`: the app in the process that gets SIGTERM.

    With worker processes (Hypercorn's default is one), the supervisor tells its workers to stop
    through a multiprocessing event, never a signal: the app learns of the stop only when its
    connections have been cancelled after `--graceful-timeout`, and they get 1011. Pass
    `options=["--workers", "1"]` to see that (the later option wins).
    """

    name = "hypercorn"

    def command(self) -> list[str]:
        args = [sys.executable, "-m", "hypercorn", "--bind", f"{HOST}:{self.port}", "--workers", "0"]
        # The error log (start-up, tracebacks) to the process's output, which goes to the log file.
        return [*args, "--log-level", self.log_level, "--error-logfile", "-", *self.options, self.app]


class GranianServer(AsgiServer):
    """`granian --interface asgi`: a supervisor process and one worker process (the app runs in
    the worker; SIGTERM goes to the supervisor, which stops the worker)."""

    name = "granian"

    def command(self) -> list[str]:
        args = [sys.executable, "-m", "granian", "--interface", "asgi", "--host", HOST, "--port", str(self.port)]
        return [*args, "--workers", "1", "--log-level", self.log_level, *self.options, self.app]


class DaphneServer(AsgiServer):
    """`daphne` (Twisted): no lifespan, and Twisted's own signal handling."""

    name = "daphne"

    def command(self) -> list[str]:
        # `-v 1` keeps Daphne's access log (to the log file): what it logs is part of the check.
        args = [sys.executable, "-m", "daphne", "--bind", HOST, "--port", str(self.port), "-v", "1"]
        return [*args, *self.options, self.app]


#: Per kind: the class and the options it always runs with.
_SERVERS: dict[ServerKind, tuple[type[UvicornServer], tuple[str, ...]]] = {
    "uvicorn-websockets-sansio": (UvicornServer, ("--ws", "websockets-sansio")),
    "uvicorn-wsproto": (UvicornServer, ("--ws", "wsproto")),
    "hypercorn": (HypercornServer, ()),
    "granian": (GranianServer, ()),
    "daphne": (DaphneServer, ()),
}

TRAITS: dict[ServerKind, ServerTraits] = {
    "uvicorn-websockets-sansio": ServerTraits(sigterm_close_code=1001),
    "uvicorn-wsproto": ServerTraits(sigterm_close_code=1001),
    "hypercorn": ServerTraits(sigterm_close_code=1001),
    "granian": ServerTraits(sigterm_close_code=1001),
    "daphne": ServerTraits(
        sigterm_close_code=None,
        standard_close_codes=False,
        note=(
            "Daphne runs no lifespan, so the app never learns of SIGTERM: Twisted drops every "
            "connection without a close frame (1006). Its WebSocket layer (autobahn) refuses to "
            "send close codes other than 1000 and 3000-4999, so 1001/1008/1009/1013 become 1000."
        ),
    ),
}


def asgi_server(
    kind: ServerKind,
    env: Mapping[str, str],
    app: str = APP,
    *,
    mount: str = "",
    workdir: Path | None = None,
    options: Sequence[str] = (),
    log_level: str = "info",
) -> UvicornServer:
    """A server of `kind` serving `app` (from `tests/integration`) with `env`, not started yet."""
    cls, fixed = _SERVERS[kind]
    return cls(env, app, mount=mount, workdir=workdir, options=[*fixed, *options], log_level=log_level)
