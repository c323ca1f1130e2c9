"""Reading the demo page (`examples/static/index.html`) in the browser: its cards, its timeline.

The page has one card per dream: a connection badge (`.connection`, `data-state`), a status badge
(`.status`, `data-status`), the message, a notice line for connection problems, the images and
the status history, newest first. `cards(page)` reads them all at once; `wait_for_cards` polls
that against a deadline and, on timeout, fails with what the page showed last.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from playwright.sync_api import Page

ROOT = Path(__file__).resolve().parents[2]
#: Ignored by git: screenshots, measured timings, screenshots of failed tests.
ARTIFACTS = ROOT / "test-artifacts"

#: Records every change of a card's connection badge (`data-state`) and status (`data-status`)
#: with the browser's clock, from before the page's own script runs (an init script).
TIMELINE_SCRIPT = """
window.__timeline = [];
new MutationObserver((records) => {
  const now = Date.now();
  for (const record of records) {
    const card = record.target.closest?.('.card');
    if (!card) continue;
    window.__timeline.push({
      t: now,
      dream: Number(card.querySelector('h2').textContent.replace(/\\D+/g, '')),
      what: record.attributeName,
      value: record.target.getAttribute(record.attributeName),
    });
  }
}).observe(document, { subtree: true, attributes: true, attributeFilter: ['data-state', 'data-status'] });
"""

_CARDS_SCRIPT = """
() => [...document.querySelectorAll('.card')].map((card) => {
  const text = (selector) => card.querySelector(selector)?.textContent.trim() ?? null;
  const notice = card.querySelector('.notice');
  return {
    dream: Number(text('h2').replace(/\\D+/g, '')),
    connection: card.querySelector('.connection').dataset.state,
    connection_text: text('.connection'),
    resume: card.querySelector('.resume').hidden ? null : text('.resume'),
    status: card.querySelector('.status').dataset.status ?? null,
    status_text: text('.status'),
    message: text('.message'),
    notice: notice.hidden ? null : notice.textContent,
    images: [...card.querySelectorAll('.images img')].map((img) => ({
      src: img.getAttribute('src'),
      alt: img.alt,
      loaded: img.complete && img.naturalWidth > 0,
    })),
    history: [...card.querySelectorAll('.history li:not(.placeholder)')].map((item) => ({
      time: item.querySelector('time').textContent,
      status: item.querySelector('[data-status]').dataset.status,
      note: item.querySelector('.note').textContent,
    })),
  };
})
"""

Card = dict[str, Any]
Cards = dict[int, Card]


def cards(page: Page) -> Cards:
    """Every card of the page as it is now, by dream id."""
    return {card["dream"]: card for card in page.evaluate(_CARDS_SCRIPT)}


def wait_for_cards(page: Page, check: Callable[[Cards], bool], what: str, timeout: float = 10.0) -> Cards:
    """Poll the cards until `check(cards)` holds; they are returned. Fails after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        now = cards(page)
        if now and check(now):
            return now
        if time.monotonic() > deadline:
            raise AssertionError(f"the page did not show {what} within {timeout}s; it shows:\n{now}")
        time.sleep(0.02)


def all_cards(condition: Callable[[Card], bool]) -> Callable[[Cards], bool]:
    """A `wait_for_cards` check: the three dreams of the page, each meeting `condition`."""
    return lambda now: sorted(now) == [1, 2, 3] and all(condition(card) for card in now.values())


def timeline(page: Page) -> list[dict[str, Any]]:
    """Every change of a badge so far: `{t: ms since the epoch, dream, what, value}`, oldest first."""
    changes: list[dict[str, Any]] = page.evaluate("window.__timeline")
    return changes


def first_change(changes: list[dict[str, Any]], dream: int, what: str, value: str, after: float) -> float:
    """The browser time (s since the epoch) `dream`'s `what` first became `value` after `after` (s)."""
    for change in changes:
        if (change["dream"], change["what"], change["value"]) == (dream, what, value) and change["t"] >= after * 1000:
            return float(change["t"]) / 1000
    raise AssertionError(f"dream {dream}'s {what} never became {value!r} after {after}: {changes}")


#: Lines for the end of the test run (the conftest's `pytest_terminal_summary`): measured timings.
SUMMARY: list[str] = []


def record_summary(line: str) -> None:
    """Print `line` now (seen with `-s`) and again at the end of the run, under "browser"."""
    print(line)
    SUMMARY.append(line)
