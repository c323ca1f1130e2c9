from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from starlette_dream_ws import DreamWebSocketApp, User, allow_any_authenticated_user

SECRET = "unit-test-secret-with-at-least-32-bytes"


def owner_only(user: User, dream_id: int) -> bool:
    """User "uN" may watch dream N; "admin" may watch all."""
    return user.id == "admin" or user.id == f"u{dream_id}"


@pytest.fixture
def make_app() -> Callable[..., DreamWebSocketApp]:
    def make(**overrides: Any) -> DreamWebSocketApp:
        overrides.setdefault("authorize", allow_any_authenticated_user)
        overrides.setdefault("jwt_secret", SECRET)
        overrides.setdefault("broadcast_url", "memory://")
        return DreamWebSocketApp(**overrides)

    return make
