"""The dream WebSocket endpoint alone, for the Celery example (`examples/celery_app.py`).

    DREAM_WS_JWT_SECRET=... uvicorn examples.server:app --port 8000     # from the repository root

Settings come from the `DREAM_WS_*` variables; the groups backend defaults to the local Redis
the worker publishes to. Run as many of these as you like: Redis fans every update out to all.
"""

from __future__ import annotations

import os

from starlette_dream_ws import DreamWebSocketApp, allow_any_authenticated_user

app = DreamWebSocketApp(
    # Example only: every holder of a valid token may watch every dream. A real app decides
    # per dream, e.g. `authorize=can_watch` checking that the user owns the dream.
    authorize=allow_any_authenticated_user,
    broadcast_url=os.environ.get("DREAM_WS_BROADCAST_URL", "redis://127.0.0.1:6379/0"),
)
