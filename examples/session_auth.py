"""Dreams watched by users signed in with the app's own session (Starlette `SessionMiddleware`).

    SESSION_SECRET=change-me uvicorn examples.session_auth:app --port 8000   # from the repository root

No JWT secret is needed: `authenticate` reads the user from the session the app already keeps
(the signed `session` cookie, which browsers send with the WebSocket handshake and the event
stream request). `SessionMiddleware` handles WebSocket scopes too, so `connection.session` is
there for the mounted component. The Origin check (same host by default) is what stops other
sites from using a visitor's cookie: keep it.

    POST /login {"name": "ada"}          -> signs in (the session cookie)
    POST /dreams/{id}/walk               -> publishes processing -> completed for that dream
    ws://HOST/ws/dreams/{id}             -> connection_established, image_update...
"""

from __future__ import annotations

import os
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from starlette_dream_ws import DreamWebSocketApp, User, asend_image_update

#: Dream id -> owner. A real app asks its database.
OWNERS: dict[int, str] = {1: "ada", 2: "ada", 3: "grace"}


def session_user(connection: HTTPConnection) -> User | None:
    """The signed-in user of this request's session, or None (the connection gets 4401)."""
    name = connection.session.get("user")
    return User(id=name, claims={}) if isinstance(name, str) else None


def owns_dream(user: User, dream_id: int) -> bool:
    return OWNERS.get(dream_id) == user.id


dream_ws = DreamWebSocketApp(authorize=owns_dream, authenticate=session_user)


async def login(request: Request) -> JSONResponse:
    body: Any = await request.json()
    name = body.get("name") if isinstance(body, dict) else None
    if not isinstance(name, str) or not name:
        return JSONResponse({"error": "name required"}, status_code=400)
    request.session["user"] = name
    return JSONResponse({"user": name})


async def walk(request: Request) -> JSONResponse:
    """Stands in for the real job: publishes a dream's statuses (its owner only)."""
    user = session_user(request)
    dream_id = request.path_params["dream_id"]
    if user is None or not owns_dream(user, dream_id):
        return JSONResponse({"error": "forbidden"}, status_code=403)
    await asend_image_update(dream_id, status="processing", message="Dreaming...", progress=50)
    await asend_image_update(dream_id, [f"https://cdn.example/{dream_id}/1.png"], "completed", progress=100)
    return JSONResponse({"published": 2})


@asynccontextmanager
async def lifespan(app: Starlette):  # type: ignore[no-untyped-def]
    async with dream_ws.lifespan():
        yield


app = Starlette(
    routes=[
        Route("/login", login, methods=["POST"]),
        Route("/dreams/{dream_id:int}/walk", walk, methods=["POST"]),
        Mount("/ws", dream_ws),
    ],
    middleware=[Middleware(SessionMiddleware, secret_key=os.environ.get("SESSION_SECRET", "change-me"))],
    lifespan=lifespan,
)
