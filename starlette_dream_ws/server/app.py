"""The mountable ASGI app: routes to consumers, one shared groups layer, a lifespan helper.

Starlette never runs a mounted app's lifespan, so the layer connects lazily on first use.
For a clean shutdown, the parent app enters `app.lifespan()` in its own lifespan::

    dream_ws = DreamWebSocketApp(authorize=can_watch)

    @asynccontextmanager
    async def lifespan(app):
        async with dream_ws.lifespan():
            yield

    app = Starlette(routes=[Mount("/ws", dream_ws)], lifespan=lifespan)

Run standalone (`uvicorn module:dream_ws`), the app handles its own lifespan.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from types import FrameType
from typing import Any

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Match, Route, Router, WebSocketRoute
from starlette.types import Receive, Scope, Send

from ..groups import BackendUnavailable, GroupLayer, shared
from ..protocol import CloseCodes, encode, error_message
from ..settings import ConfigurationError, Settings
from . import probes, redaction, sse
from .asyncapi import asyncapi_endpoint, request_document
from .auth import Authenticator, TokenVerifier
from .connection import CloseConnection
from .consumer import Consumer
from .context import ConsumerContext
from .heartbeat import Heartbeat
from .logs import configure_logging

logger = logging.getLogger("starlette_dream_ws.app")

STATIC = Path(__file__).parent.parent / "static"
#: The error a connection gets when the app cannot start (the reason is in the server's log).
MISCONFIGURED = encode(error_message("internal_error", "the server is misconfigured"))
#: Seconds `close()` waits for connections to finish closing.
SHUTDOWN_TIMEOUT = 5.0


class ConsumerApp:
    """Serves consumer classes at paths, all sharing one groups layer and one heartbeat."""

    def __init__(
        self,
        routes: Mapping[str, type[Consumer]],
        *,
        authorize: Callable[..., Any] | None = None,
        authenticate: Authenticator | None = None,
        settings: Settings | None = None,
        **overrides: Any,
    ) -> None:
        if settings is None:
            settings = Settings.from_env(**overrides)
        elif overrides:
            settings = dataclasses.replace(settings, **overrides)
        self.settings = settings
        configure_logging(settings)
        self.layer = GroupLayer(settings)
        # Before the first handshake is logged: at debug level servers print its headers.
        redaction.install()
        # Producers of this process may publish on memory:// before the first connection.
        shared.declare(self.layer)
        self._started = False
        #: Set from the moment a shutdown begins: connections that arrive then are turned away.
        self.shutting_down = False
        # The heartbeat looks at every open connection: one set of them (an entry costs tens of
        # bytes per connection in each set it is in).
        consumers: set[Consumer] = set()
        self.heartbeat = Heartbeat(settings.heartbeat_interval, settings.effective_heartbeat_timeout, consumers)
        self.context = ConsumerContext(
            settings=settings,
            layer=self.layer,
            # Made in `start()`: a missing JWT secret must not stop the app from being imported.
            verifier=None,
            heartbeat=self.heartbeat,
            authorize=authorize,
            authenticate=authenticate,
            consumers=consumers,
        )
        # Consumer routes are matched in __call__, before the router (which serves the rest):
        # each consumer at its path over WebSocket, and at `<path>/events` as an event stream.
        self._consumer_routes = [(WebSocketRoute(path, cls), cls) for path, cls in routes.items()]
        self._stream_routes = [(Route(sse.events_path(path), _no_endpoint), cls) for path, cls in routes.items()]
        self.router = Router(
            routes=[
                Route("/dream-ws.js", self._client_script, methods=["GET", "HEAD"]),
                Route("/health", self._health, methods=["GET"]),
                Route("/health/live", self._live, methods=["GET"]),
                Route("/health/ready", self._health, methods=["GET"]),
                Route("/metrics", self._metrics, methods=["GET"]),
            ],
            lifespan=lambda _: self.lifespan(),
        )
        if settings.asyncapi:
            document = asyncapi_endpoint(request_document(routes))
            self.router.routes.append(Route("/asyncapi.json", document, methods=["GET"]))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            # Matched here rather than by the router: a connection waits in these frames for
            # as long as it is open, and the router's would add a few hundred bytes to each.
            for route, consumer in self._consumer_routes:
                match, child_scope = route.matches(scope)
                if match is Match.FULL:
                    scope.update(child_scope)
                    await self._serve(consumer, scope, receive, send)
                    return
        elif scope["type"] == "http":
            for stream_route, consumer in self._stream_routes:
                match, child_scope = stream_route.matches(scope)
                if match is Match.NONE:
                    continue
                if not sse.accepts(scope):
                    for message in sse.not_allowed():
                        await send(message)
                    return
                scope.update(child_scope)
                stream = sse.EventStream(receive, send)
                await self._serve(consumer, scope, stream.receive, stream.send)
                return
        await self.router(scope, receive, send)

    async def _serve(self, consumer: type[Consumer], scope: Scope, receive: Receive, send: Send) -> None:
        """Run one connection (an event stream speaks WebSocket messages through its adapter)."""
        if self.shutting_down:
            # A client that reconnects at once (or a keep-alive connection's next request) while
            # the server stops: nobody would close it, and the server would wait for it.
            await _refuse(receive, send, CloseCodes.GOING_AWAY)
            return
        try:
            await self.start()
        except BackendUnavailable:
            pass  # the consumer closes with 1013 when it joins its group
        except ConfigurationError as exc:
            logger.error("refusing connections: %s", exc)
            await _refuse(receive, send, CloseCodes.INTERNAL_ERROR, MISCONFIGURED)
            return
        await consumer(scope, receive, send, self.context).run()

    async def start(self) -> None:
        """Check the settings and connect the groups layer (idempotent); done lazily on the
        first connection.

        Raises `ConfigurationError` (say, HS256 without a secret) and `BackendUnavailable` if
        the backend cannot be reached now.
        """
        if self._started and self.layer.connected:
            return  # every connection calls this: the common case is one check
        if self.context.authenticate is None and self.context.verifier is None:
            self.context.verifier = TokenVerifier(self.settings)
        await self.layer.connect()
        shared.register(self.layer)
        self._started = True

    async def close(self, code: int = CloseCodes.GOING_AWAY) -> None:
        """Close every connection with `code`, stop the heartbeat, disconnect the layer."""
        self.shutting_down = True
        consumers = list(self.context.consumers)
        if consumers:
            drained = self.context.drained = asyncio.Event()
            for consumer in consumers:
                consumer.close_soon(CloseConnection(code))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SHUTDOWN_TIMEOUT):
                    await drained.wait()
            self.context.drained = None
        await self.heartbeat.close()
        self._started = False
        shared.unregister(self.layer)
        await self.layer.disconnect()
        self.shutting_down = False  # a later connection starts the app again (tests, reloads)

    @contextlib.asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        """Connect on startup and close on shutdown; enter it in a parent app's lifespan.

        A backend that is down at startup does not stop the server: connections are refused
        with 1013 and `/health` answers 503 until it can be reached. On SIGTERM or SIGINT the
        connections are closed with 1001 at once (see `close_on_signals`).
        """
        try:
            await self.start()  # a ConfigurationError stops the server's start-up here
        except BackendUnavailable as exc:
            logger.warning("starting without the groups backend (%s); will retry on demand", exc)
        try:
            with close_on_signals(self):
                yield
        finally:
            await self.close()

    def begin_shutdown(self, code: int = CloseCodes.GOING_AWAY) -> None:
        """Start closing every connection with `code` now, without waiting (sync, for signals)."""
        self.shutting_down = True
        for consumer in list(self.context.consumers):
            consumer.close_soon(CloseConnection(code))

    async def _client_script(self, request: Request) -> Response:
        return FileResponse(STATIC / "dream-ws.js", media_type="text/javascript")

    async def _health(self, request: Request) -> Response:
        # Readiness, at `/health/ready` and, as before, at `/health`.
        return await probes.readiness(self)

    def metrics_text(self) -> str:
        """This process's figures in the Prometheus text format (to serve from your own route)."""
        return probes.exposition(self).text()

    async def _metrics(self, request: Request) -> Response:
        return probes.metrics(self, request)

    async def _live(self, request: Request) -> Response:
        return probes.liveness()

    def prometheus_collector(self) -> probes.DreamWsCollector:
        """A prometheus-client collector of this app's figures, read at each scrape: register it
        in your registry (`prometheus_client.REGISTRY.register(app.prometheus_collector())`)
        to serve them from your own `/metrics`. Needs the `prometheus` extra (else `ImportError`).
        """
        return probes.prometheus_collector(self)


async def _refuse(receive: Receive, send: Send, code: int, error: str | None = None) -> None:
    """Refuse a connection before any consumer runs: accepted first, as every refusal, so that
    browsers see the code (and the `error` text, if any); an event stream's adapter turns this
    into an HTTP status."""
    if (await receive())["type"] != "websocket.connect":
        return
    await send({"type": "websocket.accept"})
    if error is not None:
        await send({"type": "websocket.send", "text": error})
    await send({"type": "websocket.close", "code": code, "reason": ""})


async def _no_endpoint(request: Request) -> Response:
    raise AssertionError("stream routes are only matched, never called")


@contextlib.contextmanager
def close_on_signals(app: ConsumerApp, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> Iterator[None]:
    """Close connections with 1001 as soon as the server is asked to stop.

    uvicorn closes open WebSockets with 1012 before it runs the lifespan shutdown, so a close
    started there comes too late. This chains a handler in front of the server's own (which
    still runs, unchanged). Only possible in the main thread; elsewhere it does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    loop = asyncio.get_running_loop()
    installed: dict[int, Any] = {}

    def handler(signum: int, frame: FrameType | None) -> None:
        if not loop.is_closed():
            loop.call_soon_threadsafe(app.begin_shutdown)
        previous = installed.get(signum)
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)

    for signum in signals:
        installed[signum] = signal.signal(signum, handler)
    try:
        yield
    finally:
        for signum, previous in installed.items():
            if signal.getsignal(signum) is handler:
                signal.signal(signum, previous)
