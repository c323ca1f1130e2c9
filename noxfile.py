"""Automation: `nox -s tests`, `nox -s lint`, `nox -s types`, `nox -s demo`, `nox -s bench`."""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "types", "tests"]
nox.options.reuse_existing_virtualenvs = True


@nox.session
def tests(session: nox.Session) -> None:
    """Unit and integration tests (starts its own Redis server and uvicorn processes)."""
    session.install("-e", ".[test]")
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def types(session: nox.Session) -> None:
    session.install("-e", ".[test]", "mypy")
    session.run("mypy")


@nox.session
def demo(session: nox.Session) -> None:
    """The demo on memory://: open http://127.0.0.1:8000/."""
    session.install("-e", ".")
    session.run("python", "examples/demo.py")


@nox.session
def bench(session: nox.Session) -> None:
    """The benchmark: ours, Django Channels and a bare-ASGI ceiling, side by side (a few minutes).

    `nox -s bench -- --smoke` checks that it runs in seconds; other arguments go to bench/run.py.
    """
    session.install("-e", ".[test]", "-r", "bench/requirements.txt")
    session.run("python", "bench/run.py", *session.posargs)
