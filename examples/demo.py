"""Live dream image updates in a browser, with a simulated worker: no Redis, no network.

    python examples/demo.py          # then open http://127.0.0.1:8000/

The page loads the client from `/ws/dream-ws.js`, gets a token from `/demo-token` and
watches dreams 1, 2 and 3 while a background task walks them through their statuses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path

import jwt
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route

from starlette_dream_ws import DreamWebSocketApp, allow_any_authenticated_user, asend_image_update

logger = logging.getLogger("demo")

HERE = Path(__file__).parent
#: Signs the demo's tokens. It is in the source, so it protects nothing: a real app reads its
#: secret from the environment (DREAM_WS_JWT_SECRET) and mints tokens where users log in.
DEMO_SECRET = "demo-only-secret-do-not-use-in-production"
#: Seconds between the simulated worker's steps; read at each step, so tests can shorten it.
STEP_DELAY = float(os.environ.get("DEMO_STEP_DELAY", "3"))

# (dream id, status, images so far, message, progress): one round of the simulated worker.
# Steps of different dreams interleave, so the page shows several dreams changing at once.
# `progress` (percent, or None for no such field) is optional in an update: dreams 1 and 2
# report it while they render, as a worker that knows how far it has got would.
STEPS: list[tuple[int, str, int, str, int | None]] = [
    (1, "processing", 0, "Dreaming...", None),
    (2, "processing", 0, "Dreaming...", None),
    (3, "completed", 2, "2 images ready", None),
    (1, "processing", 1, "1 of 3 images", 33),
    (2, "processing", 1, "1 of 3 images", 33),
    (3, "delete_processing", 2, "Deleting images", None),
    (1, "processing", 2, "2 of 3 images", 67),
    (2, "failed", 1, "The dream machine ran out of ideas", None),
    (3, "delete_completed", 0, "Images deleted", None),
    (1, "completed", 3, "3 images ready", None),
]

dream_ws = DreamWebSocketApp(
    # Demo only: every holder of a valid token may watch every dream.
    authorize=allow_any_authenticated_user,
    broadcast_url="memory://",
    jwt_secret=DEMO_SECRET,
    # Shorter than the default 30 s, so pings and liveness checks show soon in the browser's devtools.
    heartbeat_interval=10,
)


async def simulate_worker() -> None:
    """Publish the steps forever, as a real image worker would with its own progress."""
    while True:
        for dream_id, status, count, message, progress in STEPS:
            images = [f"/images/dream-{dream_id}-{n}.svg" for n in range(1, count + 1)]
            try:
                await asend_image_update(dream_id, images, status, message, progress)
            except Exception:
                # A demo keeps going; a real worker would retry or mark the job failed.
                logger.exception("publishing an update of dream %s failed", dream_id)
            await asyncio.sleep(STEP_DELAY)


def mint_token(user: str = "demo", lifetime: float = 3600) -> str:
    return jwt.encode({"sub": user, "exp": int(time.time() + lifetime)}, DEMO_SECRET, algorithm="HS256")


async def demo_token(request: Request) -> Response:
    # Never cached: the client asks again before each reconnect to get a fresh one.
    return JSONResponse({"token": mint_token()}, headers={"Cache-Control": "no-store"})


async def index(request: Request) -> Response:
    return FileResponse(HERE / "static" / "index.html", media_type="text/html")


_IMAGE_NAME = re.compile(r"dream-(\d{1,6})-(\d{1,3})")


async def image(request: Request) -> Response:
    """A generated picture, so the demo needs no image files and no network."""
    match = _IMAGE_NAME.fullmatch(request.path_params["name"])
    if match is None:
        return Response(status_code=404)
    dream, number = int(match[1]), int(match[2])
    hue = (dream * 97 + number * 41) % 360
    svg = f"""<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 160 120">
<defs><linearGradient id="sky" x1="0" y1="0" x2="0" y2="1">
<stop offset="0" stop-color="hsl({hue},70%,30%)"/><stop offset="1" stop-color="hsl({(hue + 60) % 360},80%,70%)"/>
</linearGradient></defs>
<rect width="160" height="120" fill="url(#sky)"/>
<circle cx="{40 + number * 30}" cy="38" r="16" fill="hsl({(hue + 180) % 360},90%,85%)"/>
<path d="M0 95 Q40 {60 + number * 8} 80 90 T160 85 V120 H0Z" fill="hsl({hue},40%,20%)"/>
<text x="8" y="114" font-family="sans-serif" font-size="11" fill="white">dream {dream} #{number}</text>
</svg>"""
    return Response(svg, media_type="image/svg+xml", headers={"Cache-Control": "max-age=3600"})


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    # Starlette does not run a mounted app's lifespan: enter it here for a clean shutdown.
    async with dream_ws.lifespan():
        worker = asyncio.create_task(simulate_worker(), name="demo worker")
        try:
            yield
        finally:
            # Stop the worker before the layer it publishes on goes away.
            worker.cancel()
            await asyncio.wait({worker})


app = Starlette(
    routes=[
        Route("/", index),
        Route("/demo-token", demo_token),
        Route("/images/{name}.svg", image),
        Mount("/ws", dream_ws),
    ],
    lifespan=lifespan,
)


if __name__ == "__main__":
    port = int(os.environ.get("PORT", 8000))
    print(f"Dream images demo: http://127.0.0.1:{port}/", flush=True)
    uvicorn.run(app, host="127.0.0.1", port=port)
