"""The app the integration tests serve with uvicorn (`--app-dir tests/integration served_app:app`).

Settings come from the `DREAM_WS_*` environment the test gives the process. The authorizer is
deliberately not allow-all, so that 4403 is tested for real: user `u<N>` may watch dream N,
user `admin` may watch every dream, nobody else may watch anything.

`served_app:app` is the dream app on its own (uvicorn runs its lifespan); `served_app:mounted`
mounts it at `/ws` in a Starlette app without a lifespan, so it connects lazily on first use;
`served_app:mounted_with_lifespan` mounts it and enters its lifespan helper, as the README says.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.routing import Mount

from starlette_dream_ws import DreamWebSocketApp, User


async def can_watch(user: User, dream_id: int) -> bool:
    # Async on purpose: the consumer must await it.
    return user.id == "admin" or user.id == f"u{dream_id}"


app = DreamWebSocketApp(authorize=can_watch)

mounted = Starlette(routes=[Mount("/ws", app)])


@contextlib.asynccontextmanager
async def lifespan(parent: Starlette) -> AsyncIterator[None]:
    async with app.lifespan():
        yield


mounted_with_lifespan = Starlette(routes=[Mount("/ws", app)], lifespan=lifespan)
