"""The JWT handshake: where a token may travel, how it is verified, who may watch what.

A token may arrive three ways, all accepted:

1. the query string, `?token=<jwt>` (what browsers and the original module use);
2. the header `Authorization: Bearer <jwt>` (non-browser clients);
3. the WebSocket subprotocol list: the client offers `dream-ws.v1` together with
   `dream-ws.bearer.<jwt>`; the server selects `dream-ws.v1`, never echoing the token.
   This keeps the token out of URLs and access logs, so browsers should prefer it.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import jwt
from starlette.requests import HTTPConnection

from ..protocol import SUBPROTOCOL, TOKEN_SUBPROTOCOL_PREFIX
from ..settings import Settings

__all__ = [
    "SUBPROTOCOL",
    "TOKEN_SUBPROTOCOL_PREFIX",
    "AuthenticationFailed",
    "Authenticator",
    "Authorizer",
    "TokenVerifier",
    "User",
    "allow_any_authenticated_user",
    "call_authenticator",
    "call_authorizer",
    "extract_token",
]


class AuthenticationFailed(Exception):
    """The token is missing, malformed, expired or not trusted (close 4401).

    `reason` is a short machine-readable word for logs and metrics; it never holds the token.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclasses.dataclass(frozen=True, slots=True)
class User:
    """An authenticated client: the user id claim and every verified claim."""

    id: str
    claims: Mapping[str, Any]

    @property
    def expires_at(self) -> float | None:
        exp = self.claims.get("exp")
        return float(exp) if isinstance(exp, int | float) else None


#: Decides whether `user` may watch the job with this id (a dream id for dreams; the value of
#: the route's path parameter, or all of them as a dict when there are several); may be async.
Authorizer = Callable[[User, Any], bool | Awaitable[bool]]
#: Authenticates a connection from the app's own session or cookie instead of a token: returns
#: the `User`, or None to refuse (4401). Gets the handshake request (`HTTPConnection`, with
#: `.session` under Starlette's `SessionMiddleware`, `.cookies`, `.headers`); may be async.
Authenticator = Callable[[HTTPConnection], User | Awaitable[User | None] | None]


def allow_any_authenticated_user(user: User, job_id: Any) -> bool:
    """An authorizer for apps where every authenticated user may watch every dream.

    Passing it is the explicit opt-in the protocol asks for; there is no such default.
    """
    return True


async def call_authorizer(authorize: Authorizer, user: User, target: Any) -> bool:
    result = authorize(user, target)
    if inspect.isawaitable(result):
        result = await result
    return result is True


async def call_authenticator(authenticate: Authenticator, connection: HTTPConnection) -> User | None:
    result = authenticate(connection)
    if inspect.isawaitable(result):
        result = await result
    if result is not None and not isinstance(result, User):
        raise TypeError(f"authenticate must return a User or None, not {type(result).__name__}")
    return result


def extract_token(
    query: Mapping[str, str], headers: Mapping[str, str], subprotocols: list[str]
) -> tuple[str | None, str | None]:
    """Find the token in a handshake; returns `(token, subprotocol to accept)`.

    Where a client sends more than one, the subprotocol wins, then the header, then the query.
    """
    accepted = SUBPROTOCOL if SUBPROTOCOL in subprotocols else None
    for offered in subprotocols:
        if offered.startswith(TOKEN_SUBPROTOCOL_PREFIX):
            return offered[len(TOKEN_SUBPROTOCOL_PREFIX) :], accepted
    authorization = headers.get("authorization", "")
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip(), accepted
    token = query.get("token")
    return (token or None), accepted


class TokenVerifier:
    """Verifies JWTs against an explicit algorithm allowlist."""

    def __init__(self, settings: Settings) -> None:
        self._key = settings.jwt_key
        self._algorithms = list(settings.jwt_algorithms)
        self._audience = settings.jwt_audience
        self._issuer = settings.jwt_issuer
        self._leeway = settings.jwt_leeway
        self._user_claim = settings.jwt_user_claim
        required = [settings.jwt_user_claim]
        if settings.jwt_require_exp:
            required.append("exp")
        if settings.jwt_audience is not None:
            required.append("aud")
        if settings.jwt_issuer is not None:
            required.append("iss")
        # PyJWT would refuse an integer `sub`; the user claim is checked below instead.
        self._options: jwt.types.Options = {"require": required, "verify_sub": False}

    def verify(self, token: str | None) -> User:
        if not token:
            raise AuthenticationFailed("missing_token", "no token was given")
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=self._algorithms,
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
                options=self._options,
            )
        except jwt.ExpiredSignatureError:
            raise AuthenticationFailed("expired", "the token has expired") from None
        except jwt.ImmatureSignatureError:
            raise AuthenticationFailed("not_yet_valid", "the token is not valid yet") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthenticationFailed("missing_claim", f"the token has no {exc.claim!r} claim") from None
        except (jwt.InvalidAudienceError, jwt.InvalidIssuerError):
            raise AuthenticationFailed("wrong_audience_or_issuer", "the token is not meant for this service") from None
        except jwt.InvalidAlgorithmError:
            raise AuthenticationFailed("algorithm_not_allowed", "the token's algorithm is not allowed") from None
        except jwt.InvalidSignatureError:
            raise AuthenticationFailed("bad_signature", "the token's signature is not valid") from None
        except jwt.InvalidTokenError:
            # Covers malformed tokens and keys of the wrong kind. The exception text can quote
            # parts of the token, so it is never passed on.
            raise AuthenticationFailed("invalid_token", "the token is not valid") from None
        user_id = claims.get(self._user_claim)
        if not isinstance(user_id, str | int) or isinstance(user_id, bool) or user_id == "":
            raise AuthenticationFailed("missing_claim", f"the token's {self._user_claim!r} claim is not a user id")
        # Claim names repeat in every token: one copy of each for all connections.
        claims = {sys.intern(name): value for name, value in claims.items()}
        return User(id=str(user_id), claims=claims)
