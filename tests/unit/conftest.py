from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from starlette_dream_ws import DreamWebSocketApp, allow_any_authenticated_user
from tests.support.tokens import UNIT_SECRET


@pytest.fixture
def make_app() -> Callable[..., DreamWebSocketApp]:
    def make(**overrides: Any) -> DreamWebSocketApp:
        overrides.setdefault("authorize", allow_any_authenticated_user)
        overrides.setdefault("jwt_secret", UNIT_SECRET)
        overrides.setdefault("broadcast_url", "memory://")
        return DreamWebSocketApp(**overrides)

    return make
