"""`postgres://` and `postgresql://` URLs select the PostgreSQL backend: configuration only."""

from __future__ import annotations

import pytest

from starlette_dream_ws.groups import GroupLayer
from starlette_dream_ws.groups.backends import create_backend
from starlette_dream_ws.groups.backends.postgres import PostgresBackend
from starlette_dream_ws.settings import Settings

URLS = ["postgres://db:5432/dreams", "postgresql://user@db/dreams"]


@pytest.mark.parametrize("url", URLS)
def test_a_postgres_url_needs_no_other_setting(url: str) -> None:
    settings = Settings(broadcast_url=url, state_ttl=60, history_size=7)
    backend = GroupLayer(settings).build_backend()
    assert isinstance(backend, PostgresBackend)
    assert (backend._ttl, backend._history_size) == (60.0, 7)
    assert isinstance(create_backend(url), PostgresBackend)
