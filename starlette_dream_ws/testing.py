"""Test your consumers in-process, on the memory backend, with no server.

Needs the `test` extra (httpx and httpx-ws). Use it inside the test, not in an async yield
fixture, whose task switches break httpx-ws's cancel scopes::

    @pytest.mark.anyio
    async def test_updates_reach_the_owner():
        app = DreamWebSocketApp(authorize=can_watch, jwt_secret="test-secret-of-32-bytes-or-more!")
        async with ConsumerTestClient(app) as client:
            async with client.connect("/dreams/1", user="alice") as ws:
                assert (await ws.receive_json())["type"] == "connection_established"
                await asend_image_update(1, ["a.png"], "completed")
                assert (await ws.receive_json())["status"] == "completed"
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any, Literal

import httpx
import jwt
from httpx_ws import AsyncWebSocketSession, WebSocketDisconnect, aconnect_ws
from httpx_ws.transport import ASGIWebSocketTransport

from .protocol import SUBPROTOCOL, TOKEN_SUBPROTOCOL_PREFIX
from .server.app import ConsumerApp

TokenTransport = Literal["query", "header", "subprotocol"]

#: Seconds `receive_json` waits before failing the test instead of hanging it.
DEFAULT_TIMEOUT = 5.0


class ClientConnection:
    """One open test connection."""

    def __init__(self, session: AsyncWebSocketSession) -> None:
        self.session = session

    @property
    def subprotocol(self) -> str | None:
        return self.session.subprotocol

    async def send_json(self, content: Any) -> None:
        await self.session.send_json(content)

    async def send_text(self, text: str) -> None:
        await self.session.send_text(text)

    async def send_bytes(self, data: bytes) -> None:
        await self.session.send_bytes(data)

    async def receive_json(self, timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
        """The next message; raises `TimeoutError`, or `WebSocketDisconnect` if the server closed."""
        value = await self.session.receive_json(timeout=timeout)
        assert isinstance(value, dict), f"expected a JSON object, got {value!r}"
        return value

    async def receive_until(self, kind: str, timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
        """Skip messages (such as pings) until one of type `kind` arrives."""
        deadline = time.monotonic() + timeout
        while True:
            message = await self.receive_json(timeout=max(0.0, deadline - time.monotonic()))
            if message.get("type") == kind:
                return message

    async def expect_close(self, timeout: float = DEFAULT_TIMEOUT) -> tuple[int, list[dict[str, Any]]]:
        """Read until the server closes; returns the close code and the messages before it."""
        messages: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                messages.append(await self.receive_json(timeout=max(0.0, deadline - time.monotonic())))
            except WebSocketDisconnect as exc:
                return exc.code, messages


class ConsumerTestClient:
    """Runs an app in-process (with its lifespan) and opens WebSocket connections to it."""

    def __init__(self, app: ConsumerApp, *, base_url: str = "http://testserver") -> None:
        self.app = app
        self.base_url = base_url
        self._stack = contextlib.AsyncExitStack()
        self._client: httpx.AsyncClient | None = None

    async def __aenter__(self) -> ConsumerTestClient:
        await self._stack.enter_async_context(self.app.lifespan())
        transport = await self._stack.enter_async_context(ASGIWebSocketTransport(self.app))
        self._client = await self._stack.enter_async_context(
            httpx.AsyncClient(transport=transport, base_url=self.base_url)
        )
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._stack.aclose()

    @property
    def http(self) -> httpx.AsyncClient:
        assert self._client is not None, "use 'async with ConsumerTestClient(app) as client'"
        return self._client

    def token(self, user: str = "user", *, expires_in: float = 3600, **claims: Any) -> str:
        """A token the app accepts (HS* secret of its settings) for `user`."""
        settings = self.app.settings
        payload: dict[str, Any] = {settings.jwt_user_claim: user, "exp": int(time.time() + expires_in), **claims}
        if settings.jwt_audience is not None:
            payload.setdefault("aud", settings.jwt_audience)
        if settings.jwt_issuer is not None:
            payload.setdefault("iss", settings.jwt_issuer)
        return jwt.encode(payload, settings.jwt_key, algorithm=settings.jwt_algorithms[0])

    @contextlib.asynccontextmanager
    async def connect(
        self,
        path: str,
        *,
        user: str | None = "user",
        token: str | None = None,
        transport: TokenTransport = "query",
        headers: dict[str, str] | None = None,
    ) -> AsyncIterator[ClientConnection]:
        """Open a connection at `path`, authenticated as `user` (or with `token`; `user=None`
        and no token sends none), with extra handshake `headers` (an `Origin`, say)."""
        if token is None and user is not None:
            token = self.token(user)
        url = path
        headers = dict(headers or {})
        subprotocols: list[str] = []
        if token is not None:
            if transport == "query":
                url += ("&" if "?" in path else "?") + "token=" + token
            elif transport == "header":
                headers["Authorization"] = f"Bearer {token}"
            else:
                subprotocols = [SUBPROTOCOL, TOKEN_SUBPROTOCOL_PREFIX + token]
        connecting: contextlib.AbstractAsyncContextManager[AsyncWebSocketSession] = aconnect_ws(
            url,
            self.http,
            headers=headers,
            subprotocols=subprotocols or None,
            keepalive_ping_interval_seconds=None,
        )
        async with connecting as session:
            yield ClientConnection(session)

    async def publish(self, group: str, event: dict[str, Any]) -> None:
        """Publish a group event as a producer would (it must have a string `type`)."""
        await self.app.layer.publish(group, event)
