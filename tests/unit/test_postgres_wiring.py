"""`postgres://` and `postgresql://` URLs select our PostgreSQL backend and state store: configuration only."""

from __future__ import annotations

import pytest

from starlette_dream_ws.layer import HistoryBackend, create_backend
from starlette_dream_ws.postgres import PostgresBackend, PostgresStateStore
from starlette_dream_ws.settings import ConfigurationError, Settings
from starlette_dream_ws.state import create_state_store

URLS = ["postgres://db:5432/dreams", "postgresql://user@db/dreams"]


@pytest.mark.parametrize("url", URLS)
def test_a_postgres_url_needs_no_other_setting(url: str) -> None:
    settings = Settings(broadcast_url=url, state_ttl=60, history_size=7)
    assert settings.effective_state_url == url
    backend = create_backend(url, settings)
    assert isinstance(backend, PostgresBackend) and isinstance(backend, HistoryBackend)
    assert (backend._ttl, backend._history_size) == (60.0, 7)
    assert isinstance(create_backend(url), PostgresBackend)
    assert isinstance(create_state_store(url), PostgresStateStore)


def test_postgres_state_beside_another_broadcast_backend_is_accepted() -> None:
    settings = Settings(broadcast_url="redis://cache:6379/0", state_url="postgresql://db/dreams")
    assert isinstance(create_state_store(settings.effective_state_url), PostgresStateStore)
    with pytest.raises(ConfigurationError):
        Settings(broadcast_url="memory://", state_url="postgresql://db/dreams")
