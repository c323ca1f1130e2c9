"""The JWTs of the tests: the servers' secrets, and tokens signed with them."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

import jwt

#: HS256 secret shared by the integration servers and `mint_token` (>= 32 bytes, as PyJWT wants).
JWT_SECRET = "integration-secret-0123456789abcdef-0123456789"
#: Another secret: a token signed with it is refused.
OTHER_SECRET = "not-the-servers-secret-0123456789abcdef-987654"
#: HS256 secret of the browser tests' page server and its token endpoint.
PAGE_JWT_SECRET = "browser-tests-secret-0123456789abcdef-0123456789"

#: HS256 secret of the unit tests' in-process apps.
UNIT_SECRET = "unit-test-secret-with-at-least-32-bytes"

#: `make_token("u7")` (the fixture): `mint_token` or a function like it.
TokenFactory = Callable[..., str]


def mint_token(sub: str, *, expires_in: float = 300.0, secret: str = JWT_SECRET, **claims: object) -> str:
    """An HS256 JWT for user `sub`, valid 5 minutes (tune with keywords; `claims` are added)."""
    # A fresh `jti` makes every token unique, so a token found in a log is this one.
    payload = {"sub": sub, "exp": int(time.time() + expires_in), "jti": uuid.uuid4().hex, **claims}
    return jwt.encode(payload, secret, algorithm="HS256")
