"""A second job kind beside dreams: video renders with UUID ids and a percent progress, in FastAPI.

    uvicorn examples.video_renders:app --port 8000     # from the repository root

No JWT here: the app signs users in with its own cookie, and one function, `signed_in_user`,
decides who is calling for the HTTP routes (as a FastAPI dependency) and for the WebSocket and
event-stream connections (as the component's `authenticate` hook). Then, as a browser would:

    POST /login {"name": "ada"}            -> sets the `session` cookie
    POST /renders                          -> {"render_id": "<uuid>"}, the render starts
    ws://HOST/live/renders/<uuid>          -> connection_established, render_update... (percent 0-100)
    GET  /live/renders/<uuid>/events       -> the same as Server-Sent Events

A render is watched by its owner only (`can_watch`). The render itself is simulated by a
background task publishing with `apublish`; a Celery worker would call the sync `publish`.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import uuid
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import BackgroundTasks, Depends, FastAPI, HTTPException, Request, Response
from pydantic import BaseModel
from starlette.requests import HTTPConnection

from starlette_dream_ws import ConsumerApp, JobConsumer, User, apublish, job_group

#: The group kind of renders: producers publish to `job_group(RENDERS, render_id)`.
RENDERS = "video_renders"
#: Seconds of simulated work between two progress updates.
STEP_DELAY = float(os.environ.get("RENDER_STEP_DELAY", "0.2"))
PROGRESS_STEPS = (0, 25, 50, 75, 100)

#: Session id (the cookie's value) -> user name. A real app keeps sessions in its store.
sessions: dict[str, str] = {}
#: Render id -> its owner's user name.
owners: dict[uuid.UUID, str] = {}


def signed_in_user(connection: HTTPConnection) -> User | None:
    """Who holds this request's session cookie: for HTTP routes and live connections alike."""
    name = sessions.get(connection.cookies.get("session", ""))
    return None if name is None else User(id=name, claims={})


def require_user(request: Request) -> User:
    """The FastAPI dependency of the HTTP routes (401 when signed out)."""
    user = signed_in_user(request)
    if user is None:
        raise HTTPException(status_code=401, detail="sign in first")
    return user


def can_watch(user: User, render_id: uuid.UUID) -> bool:
    """The integrator's decision: a render is watched by the user who started it."""
    return owners.get(render_id) == user.id


def render_update(render_id: uuid.UUID, state: str, percent: int) -> dict[str, Any]:
    """The event a render publishes (and its watchers receive), shaped in one place."""
    return {"type": "render_update", "render_id": str(render_id), "state": state, "percent": percent}


class RenderConsumer(JobConsumer):
    """Streams one render's progress: `render_update` events, `request_status` for the latest."""

    group_kind = RENDERS

    async def render_update(self, event: dict[str, Any]) -> None:
        """A render's progress: `state` (rendering, done) and `percent` (0-100)."""
        await self.send_json(event)


live = ConsumerApp(
    {"/renders/{render_id:uuid}": RenderConsumer},
    authorize=can_watch,
    authenticate=signed_in_user,
    heartbeat_interval=float(os.environ.get("DREAM_WS_HEARTBEAT_INTERVAL", "30")),
)


@asynccontextmanager
async def lifespan(app: FastAPI):  # type: ignore[no-untyped-def]
    async with live.lifespan():
        yield


app = FastAPI(lifespan=lifespan)
app.mount("/live", live)


class Login(BaseModel):
    name: str


@app.post("/login")
async def login(body: Login, response: Response) -> dict[str, str]:
    session = secrets.token_urlsafe(16)
    sessions[session] = body.name
    response.set_cookie("session", session, httponly=True, samesite="lax")
    return {"user": body.name}


@app.post("/renders")
async def start_render(user: Annotated[User, Depends(require_user)], tasks: BackgroundTasks) -> dict[str, str]:
    render_id = uuid.uuid4()
    owners[render_id] = user.id
    # Run by the server after the response, in the request's own task (which owns it).
    tasks.add_task(render, render_id)
    return {"render_id": str(render_id)}


async def render(render_id: uuid.UUID) -> None:
    """Stands in for the real work: publishes each step's progress."""
    group = job_group(RENDERS, render_id)
    for percent in PROGRESS_STEPS:
        await asyncio.sleep(STEP_DELAY)
        state = "done" if percent == 100 else "rendering"
        await apublish(group, render_update(render_id, state, percent))
