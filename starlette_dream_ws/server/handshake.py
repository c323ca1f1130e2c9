"""The handshake of a connection: Origin, who is connecting, per-user limit, authorization.

`Handshake` adds to `Connection` (the transport) what an integrator overrides to decide who
may connect; `Consumer` adds the life cycle and dispatch on top of it.
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.datastructures import Headers, QueryParams
from starlette.requests import HTTPConnection
from starlette.types import Receive, Scope, Send

from ..protocol import CloseCodes
from ..settings import Settings
from .auth import AuthenticationFailed, User, call_authenticator, call_authorizer, extract_token
from .connection import CloseConnection, Connection
from .context import ConsumerContext
from .limits import origin_allowed
from .logs import log_event

#: Where a refused Origin is allowed (named in the log line and the error).
ORIGIN_SETTING = "DREAM_WS_ALLOWED_ORIGINS"
ORIGIN_HINT = f"allow it with {ORIGIN_SETTING} (the allowed_origins setting)"


class Handshake(Connection):
    """The checks of `connect()`: each a hook to override."""

    __slots__ = ("context", "counted_user", "settings", "user")

    def __init__(self, scope: Scope, receive: Receive, send: Send, context: ConsumerContext) -> None:
        super().__init__(scope, receive, send, context.metrics)
        self.context = context
        self.settings: Settings = context.settings
        self.user: User | None = None
        #: The user id this connection counts against in `max_connections_per_user`.
        self.counted_user: str | None = None

    @property
    def connection(self) -> HTTPConnection:
        """The handshake request: headers, query parameters, client address."""
        return HTTPConnection(self.scope)

    # -- hooks ------------------------------------------------------------------------------

    async def connect(self) -> None:
        """Handshake: accept, authenticate the token, ask `authorize()`.

        Accepting first lets close codes reach browsers: a refused handshake shows them
        only 1006. Override to join groups and greet the client, calling this first.
        """
        await self.accept()
        self.check_origin()
        self.user = await self.authenticate()
        self.count_user(self.user)
        if not await self.authorize():
            raise CloseConnection(CloseCodes.FORBIDDEN, "forbidden", "you may not watch this")

    def check_origin(self) -> None:
        """Refuse pages of other sites (cross-site WebSocket hijacking) with 1008."""
        headers = self._headers()
        origin = headers.get("origin")
        if not origin_allowed(origin, headers.get("host"), self.settings.allowed_origins):
            # The hint names the setting: a dev server on another port (localhost:5173) is the
            # usual case, and its developer reads the browser console or the server log.
            self.log_event(
                "refused", logging.WARNING, reason="origin_not_allowed", origin=origin, setting=ORIGIN_SETTING
            )
            raise CloseConnection(
                CloseCodes.POLICY_VIOLATION, "origin_not_allowed", f"this origin may not connect ({ORIGIN_HINT})"
            )

    def count_user(self, user: User) -> None:
        """Count this connection against its user's limit (1013 past `max_connections_per_user`)."""
        if not self.context.count_user(user.id):
            raise CloseConnection(
                CloseCodes.TRY_AGAIN_LATER, "too_many_connections", "this user has too many open connections"
            )
        self.counted_user = user.id

    async def authenticate(self) -> User:
        """Who is connecting: the app's `authenticate(connection)` if it has one, else the token
        (query, `Authorization` header or subprotocol); 4401 if nobody."""
        if self.context.authenticate is not None:
            user = await call_authenticator(self.context.authenticate, self.connection)
            if user is None:
                self.log_event("auth_failed", reason="not_authenticated")
                raise CloseConnection(CloseCodes.UNAUTHENTICATED, "unauthenticated", "please sign in")
            return user
        if self.context.verifier is None:
            raise CloseConnection(CloseCodes.UNAUTHENTICATED, "unauthenticated", "no token verifier configured")
        query = QueryParams(self.scope.get("query_string", b""))
        token, _ = extract_token(query, self._headers(), self.offered_subprotocols())
        try:
            return self.context.verifier.verify(token)
        except AuthenticationFailed as exc:
            self.log_event("auth_failed", reason=exc.reason)
            raise CloseConnection(CloseCodes.UNAUTHENTICATED, "unauthenticated", exc.message) from None

    async def authorize(self) -> bool:
        """May `self.user` use this connection? Asks the app's `authorize(user, target)` with
        `authorization_target()`; denies if the app has none (and a subclass does not decide)."""
        if self.context.authorize is None or self.user is None:
            return False
        return await call_authorizer(self.context.authorize, self.user, self.authorization_target())

    def authorization_target(self) -> Any:
        """What `authorize` is asked about: the route's path parameter (a job id), or all of
        them as a dict when there are several (or none)."""
        params = self.scope.get("path_params") or {}
        return next(iter(params.values())) if len(params) == 1 else dict(params)

    def log_event(self, event: str, level: int = logging.INFO, **fields: Any) -> None:
        """One structured log line (`logs.log_event`), with this connection's path and user."""
        log_event(self.scope, self.user.id if self.user is not None else None, event, level, **fields)

    def _headers(self) -> Headers:
        # A copy that lives as long as the call: `self.connection.headers` would store its copy in
        # the scope, for as long as the connection is open.
        return Headers(raw=list(self.scope.get("headers") or ()))
