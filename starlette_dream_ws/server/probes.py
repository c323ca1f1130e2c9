"""The app's operations endpoints: liveness, readiness and metrics.

Liveness never looks at the backend: an orchestrator restarts a process whose liveness probe
fails, and restarting every server because Redis is down would only add a reconnect storm.
Readiness does look at it, so traffic goes to the servers that can deliver updates.
"""

from __future__ import annotations

import logging
import weakref
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from ..groups import BackendUnavailable
from ..settings import ConfigurationError
from .metrics import CONTENT_TYPE, Exposition, Figures, scrape_allowed

if TYPE_CHECKING:
    from .app import ConsumerApp
    from .prometheus import DreamWsCollector as DreamWsCollector

logger = logging.getLogger("starlette_dream_ws.app")

#: Each app's exposition, made on its first scrape (an app holds no reference to it).
_expositions: weakref.WeakKeyDictionary[ConsumerApp, Exposition] = weakref.WeakKeyDictionary()


def liveness() -> Response:
    return JSONResponse({"status": "ok"})


async def readiness(app: ConsumerApp) -> Response:
    """200 while the groups backend is reachable, else 503 (the body says why)."""
    status = None
    # A mounted app may not have connected yet: a readiness probe must not wait for traffic.
    try:
        await app.start()
    except BackendUnavailable:
        pass  # answered below from the layer's state
    except ConfigurationError as exc:
        # Logged here too: an app that is never ready gets no connections to log it. The body
        # only says that, as a probe's answer may be seen by more people than the log.
        logger.error("not ready: %s", exc)
        status = "misconfigured"
    healthy = status is None and app.layer.healthy
    metrics = app.context.metrics
    return JSONResponse(
        {
            "status": status or ("ok" if healthy else "unavailable"),
            "backend_connected": app.layer.healthy,
            "connections": len(app.context.consumers),
            "backend_reconnects": app.layer.reconnects,
            "slow_closed": metrics.slow_closed,
            "dropped": metrics.dropped,
        },
        status_code=200 if healthy else 503,
    )


def metrics(app: ConsumerApp, request: Request) -> Response:
    """The metrics endpoint: 404 unless enabled, 401 without the configured bearer token."""
    settings = app.settings
    if not settings.metrics:
        return PlainTextResponse("Not Found", status_code=404)
    if not scrape_allowed(settings.metrics_token, request.headers.get("authorization")):
        return PlainTextResponse("Unauthorized", status_code=401, headers={"WWW-Authenticate": "Bearer"})
    return PlainTextResponse(exposition(app).text(), media_type=CONTENT_TYPE)


def figures(app: ConsumerApp) -> Figures:
    return Figures(
        app.context.metrics,
        app.layer.publish_metrics,
        open_connections=len(app.context.consumers),
        backend_connected=app.layer.healthy,
        backend_reconnects=app.layer.reconnects,
    )


def exposition(app: ConsumerApp) -> Exposition:
    found = _expositions.get(app)
    if found is None:
        # The app is held weakly: a collector left registered in a registry after its app is
        # gone yields nothing rather than keeping the app alive.
        ref = weakref.ref(app)

        def read() -> Figures | None:
            current = ref()
            return None if current is None else figures(current)

        found = _expositions.setdefault(app, Exposition(read))
    return found


def prometheus_collector(app: ConsumerApp) -> DreamWsCollector:
    return exposition(app).collector()
