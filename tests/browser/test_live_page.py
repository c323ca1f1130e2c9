"""The demo page in headless Chromium: live updates, a server that dies and comes back, a refused token.

The page (`examples/static/index.html`, with the client `dream-ws.js`) is served by a real uvicorn
process; updates come from a separate producer process through Redis (`page_app.py`), except in
the first test, which serves the demo itself with its simulated worker. Assertions are on the DOM,
as a person would see it: connection badges, status badges, messages, images, history.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.support.producers import producer_call, run_producer

from .live_page import ARTIFACTS, ROOT, Card, all_cards, cards, first_change, record_summary, timeline, wait_for_cards

if TYPE_CHECKING:
    from playwright.sync_api import Page, WebSocket

    from tests.support.uvicorn import ServerFactory

pytestmark = pytest.mark.browser


def images(dream: int, count: int) -> list[str]:
    """URLs of the pictures the demo generates (`/images/dream-<dream>-<n>.svg`)."""
    return [f"/images/dream-{dream}-{n}.svg" for n in range(1, count + 1)]


def publish(redis_url: str, *calls: dict[str, Any], pause: float = 0.0) -> None:
    """`send_image_update(**call)` for each call, in one separate producer process; all must succeed."""
    outcomes = run_producer(redis_url, [{**call, "pause_before": pause} for call in calls])
    assert outcomes == [{"ok": True}] * len(calls), outcomes


def is_open(card: Card) -> bool:
    return bool(card["connection"] == "open" and card["connection_text"] == "open")


def showing(status: str, message: str, image_count: int) -> Any:
    """A card check: this status and message, and that many images, all loaded."""

    def check(card: Card) -> bool:
        loaded = [image["loaded"] for image in card["images"]]
        return bool(card["status"] == status and card["message"] == message and loaded == [True] * image_count)

    return check


def save_screenshot(page: Page, name: str) -> Path:
    """The page as a person sees it, in test-artifacts/`name`."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    # The body: the whole page and no empty viewport below it. `animations="disabled"` ends the
    # images' fade-in, so the picture is the page at rest.
    page.locator("body").screenshot(path=str(path), animations="disabled")
    return path


# -- the demo as shipped ------------------------------------------------------------------


def test_the_demo_walks_its_dreams_live(page: Page, start_server: ServerFactory) -> None:
    """`examples/demo.py` itself (memory://, its simulated worker) renders in the browser."""
    server = start_server("examples.demo:app", env={"DEMO_STEP_DELAY": "0.05"})
    page.goto(server.base_url)
    assert page.title() == "Dream images: live demo"
    # A full round of the worker: dream 1 ends completed with 3 images, dream 2 failed, dream 3 deleted.
    shown = wait_for_cards(
        page,
        lambda now: (
            sorted(now) == [1, 2, 3]
            and all(is_open(card) and len(card["history"]) >= 3 for card in now.values())
            and now[1]["status"] == "completed"
        ),
        "every dream connected with some history, dream 1 completed",
    )
    assert [card["dream"] for card in shown.values()] == [1, 2, 3]
    assert all(card["notice"] is None for card in shown.values())
    assert shown[1]["status_text"] == "completed"
    assert shown[1]["message"] == "3 images ready"
    assert [image["src"] for image in shown[1]["images"]] == images(1, 3)
    assert shown[1]["history"][0]["status"] == "completed"


# -- the page on Redis, fed by a producer process -----------------------------------------

#: What the producer publishes for the live-page test and the screenshot: each dream's history.
STORY: list[dict[str, Any]] = [
    producer_call(1, [], "processing", "Dreaming..."),
    producer_call(2, [], "processing", "Dreaming..."),
    producer_call(3, [], "processing", "Dreaming..."),
    producer_call(1, images(1, 1), "processing", "1 of 3 images"),
    producer_call(3, images(3, 1), "processing", "1 of 3 images"),
    producer_call(2, images(2, 1), "processing", "1 of 3 images"),
    producer_call(1, images(1, 2), "processing", "2 of 3 images"),
    producer_call(2, images(2, 2), "processing", "2 of 3 images"),
    producer_call(3, images(3, 1), "failed", "The dream machine ran out of ideas"),
    producer_call(1, images(1, 3), "completed", "3 images ready"),
]

#: How the page must look after STORY: `(status, message, images, history newest first)` by dream.
AFTER_STORY = {
    1: ("completed", "3 images ready", 3, ["completed", "processing", "processing", "processing"]),
    2: ("processing", "2 of 3 images", 2, ["processing", "processing", "processing"]),
    3: ("failed", "The dream machine ran out of ideas", 1, ["failed", "processing", "processing"]),
}


def show_the_story(page: Page, server_url: str, redis_url: str, pause: float = 0.05) -> dict[int, Card]:
    """Open the page, let the producer publish STORY (`pause` s between updates), wait until the page shows it."""
    page.goto(server_url)
    # Before any update: connected, nothing to show (request_status answers status_unknown).
    before = wait_for_cards(page, all_cards(is_open), "three open connections")
    for card in before.values():
        assert card["status"] is None and card["status_text"] == "no update yet"
        assert card["images"] == [] and card["history"] == [] and card["notice"] is None
    publish(redis_url, *STORY, pause=pause)
    return wait_for_cards(
        page,
        lambda now: all(
            showing(status, message, count)(now[dream]) and len(now[dream]["history"]) == len(history)
            for dream, (status, message, count, history) in AFTER_STORY.items()
        ),
        "the end of the story",
    )


def test_the_page_renders_what_a_producer_process_publishes(
    page: Page, start_server: ServerFactory, redis_url: str
) -> None:
    server = start_server()
    shown = show_the_story(page, server.base_url, redis_url)
    for dream, (status, message, count, history) in AFTER_STORY.items():
        card = shown[dream]
        assert is_open(card) and card["notice"] is None
        assert card["status"] == status and card["status_text"] == status.replace("_", " ")
        assert card["message"] == message
        assert [image["src"] for image in card["images"]] == images(dream, count)
        assert [image["alt"] for image in card["images"]] == [f"dream {dream}, image {n}" for n in range(1, count + 1)]
        assert [item["status"] for item in card["history"]] == history
        notes = [call["message"] for call in STORY if call["dream_id"] == dream]
        assert [item["note"] for item in card["history"]] == notes[::-1]
        assert all(len(item["time"]) == 8 for item in card["history"])  # HH:MM:SS


def test_screenshot_of_the_live_page(page: Page, start_server: ServerFactory, redis_url: str) -> None:
    """test-artifacts/demo.png; with UPDATE_SCREENSHOT=1 also docs/demo.png, the README's picture."""
    server = start_server()
    # Paced as a worker's progress would be, so the history shows the time going by.
    show_the_story(page, server.base_url, redis_url, pause=0.3)
    path = save_screenshot(page, "demo.png")
    assert path.stat().st_size > 10_000
    if os.environ.get("UPDATE_SCREENSHOT") == "1":
        shutil.copyfile(path, ROOT / "docs" / "demo.png")


# -- a server that dies, and comes back ---------------------------------------------------


def test_the_page_reconnects_to_a_restarted_server_and_catches_up(
    page: Page, start_server: ServerFactory, redis_url: str
) -> None:
    server = start_server()
    page.goto(server.base_url)
    wait_for_cards(page, all_cards(is_open), "three open connections")
    publish(redis_url, *(producer_call(dream, [], "processing", "Dreaming...") for dream in (1, 2, 3)))
    wait_for_cards(page, all_cards(showing("processing", "Dreaming...", 0)), "every dream processing")

    server.kill()  # SIGKILL: no close frame, as after a crash
    lost = wait_for_cards(page, all_cards(lambda card: card["connection"] == "reconnecting"), "reconnecting")
    for card in lost.values():
        assert card["connection_text"].startswith("reconnecting in "), card
        assert card["connection_text"].endswith(" s"), card

    # While the server is down, the producer goes on: Redis keeps each dream's latest state.
    away = {
        1: ("completed", "3 images ready", 3),
        2: ("failed", "The dream machine ran out of ideas", 1),
        3: ("processing", "1 of 3 images", 1),
    }
    publish(redis_url, *(producer_call(dream, images(dream, n), s, m) for dream, (s, m, n) in away.items()))
    still = cards(page)
    assert all(card["status"] == "processing" and card["connection"] == "reconnecting" for card in still.values())
    save_screenshot(page, "reconnecting.png")

    spawned = time.time()
    server.start()  # same port
    ready = time.time()
    back = wait_for_cards(
        page,
        lambda now: all(is_open(now[dream]) and showing(s, m, n)(now[dream]) for dream, (s, m, n) in away.items()),
        "every dream reconnected and re-synced",
        timeout=25,
    )
    for dream, (status, message, _) in away.items():
        card = back[dream]
        assert card["notice"] is None
        # It resumed from the update it had shown: the one it missed came back, no re-sync needed.
        assert card["resume"] == "resumed", card
        # The missed update is the latest state, which the history lists once.
        assert [(item["status"], item["note"]) for item in card["history"]] == [
            (status, message),
            ("processing", "Dreaming..."),
        ]

    # The timings, from the page's own clock (the timeline of its badges).
    changes = timeline(page)
    timings = {}
    for dream, (status, _, _) in away.items():
        opened = first_change(changes, dream, "data-state", "open", after=spawned)
        synced = first_change(changes, dream, "data-status", status, after=spawned)
        timings[dream] = {
            "spawn_to_open_ms": round((opened - spawned) * 1000),
            "ready_to_open_ms": round((opened - ready) * 1000),
            "open_to_resynced_ms": round((synced - opened) * 1000),
        }
    server_start_ms = round((ready - spawned) * 1000)
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "reconnect-timings.json").write_text(
        json.dumps({"server_start_ms": server_start_ms, "dreams": timings}, indent=2) + "\n"
    )
    record_summary(f"server restart: spawn to ready (uvicorn answers /ws/health) {server_start_ms} ms")
    for dream, timing in timings.items():
        record_summary(
            f"dream {dream}: ready to 'open' {timing['ready_to_open_ms']} ms "
            f"(spawn to 'open' {timing['spawn_to_open_ms']} ms), "
            f"'open' to re-synced state {timing['open_to_resynced_ms']} ms"
        )
    for timing in timings.values():
        assert 0 <= timing["open_to_resynced_ms"] < 2000, timings


# -- a token that has expired -------------------------------------------------------------


def test_an_expired_token_shows_auth_failed_and_stops_retrying(page: Page, start_server: ServerFactory) -> None:
    server = start_server()
    # The page's token endpoint now mints tokens that expired a minute ago.
    page.context.add_cookies([{"name": "token_lifetime", "value": "-60", "url": server.base_url}])
    handshakes: list[WebSocket] = []
    page.on("websocket", lambda ws: handshakes.append(ws))

    page.goto(server.base_url)
    refused = wait_for_cards(page, all_cards(lambda card: card["connection"] == "auth_failed"), "auth_failed")
    for card in refused.values():
        assert card["connection_text"] == "auth failed"
        assert card["notice"] == "Not allowed (4401): the token has expired"
        assert card["status"] is None and card["history"] == []

    # Each dream tried twice: its first token, and one fresh token after the 4401 (getToken may
    # mend an expired token). Then nothing more: no handshake within a window well past the
    # longest first backoff (0.5 s), by the browser's own count and by the server's access log.
    assert sorted(int(ws.url.rsplit("/", 1)[1]) for ws in handshakes) == [1, 1, 2, 2, 3, 3]
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    with pytest.raises(PlaywrightTimeout):
        extra = page.wait_for_event("websocket", timeout=3000)
        pytest.fail(f"a connection attempt after auth_failed: {extra.url}")
    assert len(handshakes) == 6
    assert server.log_text().count('"WebSocket /ws/dreams/') == 6, server.log_text()
    assert all(card["connection"] == "auth_failed" for card in cards(page).values())
    save_screenshot(page, "auth-failed.png")
