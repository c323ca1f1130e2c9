"""Headless Chromium for the browser tests: Debian's `chromium`, never a browser Playwright downloads.

`CHROMIUM` may name another binary. Without a browser the tests are skipped on a developer's
machine, and FAIL when the `CI` variable is set: a CI that lost its browser must not pass
without running them.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, NoReturn

import pytest

#: What Chromium needs here: root (no sandbox), no GPU, and no traffic of its own (this machine
#: refuses connections to anything but the registries, and CI's may too). Playwright adds
#: `--headless` and a fresh, empty `--user-data-dir` of its own to every launch.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

#: Milliseconds a Playwright call may wait (a page load, a screenshot) before it fails.
PLAYWRIGHT_TIMEOUT = 10_000


def find_chromium() -> str | None:
    """`CHROMIUM` if set, else `chromium` (Debian) or `chromium-browser` on PATH."""
    configured = os.environ.get("CHROMIUM")
    if configured:
        return configured
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def browser_unavailable(reason: str) -> NoReturn:
    """Skip the test, or fail it when `CI` is set."""
    if in_ci():
        pytest.fail(f"the browser tests cannot run, and CI is set: {reason}", pytrace=False)
    pytest.skip(f"no browser: {reason}")


#: Defines `DreamSocket`, `until(check, ms)` (resolves when `check()` holds, rejects after `ms`) and
#: `pause(ms)` for the scenario that follows; the scenario's `return` is the test's result.
PRELUDE = """
const { DreamSocket } = await import('/ws/dream-ws.js');
const pause = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
async function until(check, ms, what) {
  for (const end = Date.now() + ms; !check(); await pause(5)) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
  }
}
"""


def run_in_page(page: Any, base_url: str, scenario: str, arg: Any = None) -> Any:
    """Run `scenario` (the body of an async function of `arg`, after PRELUDE) in a page of `base_url`."""
    page.goto(f"{base_url}/ws/health")  # any page of the origin: the module is imported by the script
    return page.evaluate(f"async (arg) => {{ {PRELUDE}\n{scenario} }}", arg)
