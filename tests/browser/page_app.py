"""The demo page on Redis, for the browser tests: `uvicorn tests.browser.page_app:app` (app dir: the repo root).

It serves what the demo serves (`examples/static/index.html`, its generated pictures, the client
at `/ws/dream-ws.js`) without the demo's simulated worker: updates come from a separate producer
process through Redis, as in production. The dream app reads its settings from the `DREAM_WS_*`
environment the test gives the process (`BROADCAST_URL`, `JWT_SECRET`, ...).

`/demo-token` mints tokens signed with `DREAM_WS_JWT_SECRET`. A `token_lifetime` cookie (seconds,
negative allowed) changes their lifetime: a test sets it to mint tokens that have already expired.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import AsyncIterator

import jwt
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route

from examples import demo
from starlette_dream_ws import DreamWebSocketApp, allow_any_authenticated_user

#: Seconds a token lives unless the `token_lifetime` cookie says otherwise.
TOKEN_LIFETIME = 3600.0

# As in the demo: every holder of a valid token may watch every dream.
dream_ws = DreamWebSocketApp(authorize=allow_any_authenticated_user)


async def demo_token(request: Request) -> Response:
    try:
        lifetime = float(request.cookies.get("token_lifetime", TOKEN_LIFETIME))
    except ValueError:
        return JSONResponse({"error": "token_lifetime must be a number of seconds"}, status_code=400)
    claims = {"sub": "browser-test", "exp": int(time.time() + lifetime)}
    token = jwt.encode(claims, os.environ["DREAM_WS_JWT_SECRET"], algorithm="HS256")
    return JSONResponse({"token": token}, headers={"Cache-Control": "no-store"})


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    async with dream_ws.lifespan():
        yield


app = Starlette(
    routes=[
        Route("/", demo.index),
        Route("/demo-token", demo_token),
        Route("/images/{name}.svg", demo.image),
        Mount("/ws", dream_ws),
    ],
    lifespan=lifespan,
)
