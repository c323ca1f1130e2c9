"""Fixtures of the browser tests: headless Chromium driven by Playwright, pages served by uvicorn.

The browser is Debian's `chromium` package (`apt-get install chromium`), never a browser that
Playwright downloads; `CHROMIUM` may name another binary. Without a browser (or without the
`playwright` package) the tests are skipped on a developer's machine, and FAIL when the `CI`
variable is set: a CI that lost its browser must not pass without running them
(`tests/support/browser.py`).

What the tests leave for a person to look at goes to `test-artifacts/` at the repo root (ignored
by git): screenshots, the measured timings, and a screenshot of the page of any failed test.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import redis

from tests.support.browser import CHROMIUM_ARGS, PLAYWRIGHT_TIMEOUT, browser_unavailable, find_chromium
from tests.support.redis import RedisServer
from tests.support.tokens import PAGE_JWT_SECRET
from tests.support.uvicorn import ServerFactory, UvicornServer, stop_and_check

from .live_page import ARTIFACTS, ROOT, SUMMARY, TIMELINE_SCRIPT

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if SUMMARY:
        terminalreporter.section("browser")
        for line in SUMMARY:
            terminalreporter.write_line(line)


# -- the browser --------------------------------------------------------------------------


@pytest.fixture(scope="package")
def browser() -> Iterator[Browser]:
    """One headless Chromium for the package (a fresh context per test), closed after its last test."""
    executable = find_chromium()
    if executable is None:
        browser_unavailable("no chromium on PATH: `apt-get install chromium` (Debian), or set CHROMIUM to a binary")
    try:
        from playwright.sync_api import Error, sync_playwright
    except ImportError:
        browser_unavailable(
            "the playwright package is not installed: `pip install playwright` (no `playwright install`)"
        )
    try:
        playwright = sync_playwright().start()  # Playwright's driver, a node process of its wheel
    except Exception as exc:
        browser_unavailable(f"Playwright's driver did not start: {exc}")
    try:
        launched = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, timeout=30_000)
    except Error as exc:
        playwright.stop()
        browser_unavailable(f"{executable} did not start: {exc.message}")
    try:
        yield launched
    finally:
        launched.close()
        playwright.stop()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A page in a fresh context (no cookies, no cache), its timeline recorded from the start.

    An uncaught error in the page (a listener of the client that throws, a broken script) fails
    the test."""
    context = browser.new_context(viewport={"width": 1280, "height": 720})
    context.set_default_timeout(PLAYWRIGHT_TIMEOUT)
    context.add_init_script(TIMELINE_SCRIPT)
    new_page = context.new_page()
    errors: list[str] = []
    new_page.on("pageerror", lambda error: errors.append(f"{error.name}: {error.message}"))
    try:
        yield new_page
    finally:
        context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


# -- servers ------------------------------------------------------------------------------


@pytest.fixture(scope="package")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Redis of the package's own: the page server and the producer processes meet there."""
    with RedisServer(workdir=tmp_path_factory.mktemp("browser-redis")) as server:
        yield server.url


#: The servers a test started, for the report of a failed test.
SERVERS = pytest.StashKey[list[UvicornServer]]()


@pytest.fixture
def start_server(redis_url: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[ServerFactory]:
    """`start_server()`: the page app (`tests/browser/page_app.py`) on an empty Redis, started.

    `start_server(app="examples.demo:app", env={...})` serves another app of the repo. Every server
    is stopped after the test, which fails if one did not shut down cleanly."""
    started: list[UvicornServer] = []
    request.node.stash[SERVERS] = started

    def start(app: str = "tests.browser.page_app:app", env: Mapping[str, str] | None = None) -> UvicornServer:
        with redis.Redis.from_url(redis_url) as client:
            client.flushall()  # the page shows dreams 1, 2 and 3: no state left by another test
        server_env = {"DREAM_WS_BROADCAST_URL": redis_url, "DREAM_WS_JWT_SECRET": PAGE_JWT_SECRET, **(env or {})}
        server = UvicornServer(server_env, app, mount="/ws", app_dir=ROOT, workdir=tmp_path / f"server-{len(started)}")
        started.append(server)
        server.start()
        return server

    yield start
    problems = stop_and_check(started)
    assert not problems, "\n".join(problems)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failed test leaves a screenshot of its page in test-artifacts/failures/, and shows its servers' logs."""
    report = yield
    if report.failed and call.when == "call":
        funcargs = getattr(item, "funcargs", {})
        failed_page = funcargs.get("page")
        if failed_page is not None:
            path = ARTIFACTS / "failures" / f"{item.name}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                failed_page.screenshot(path=str(path), full_page=True, timeout=5_000)
                report.sections.append(("page screenshot", str(path)))
            except Exception as exc:  # the page may be what broke
                report.sections.append(("page screenshot", f"none: {exc}"))
        for server in item.stash.get(SERVERS, []):
            report.sections.append((f"uvicorn {server.base_url} log (tail)", server.log_text()[-4000:]))
    return report
