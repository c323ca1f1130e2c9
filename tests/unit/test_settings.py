"""Settings: defaults, DREAM_WS_* variables, keyword overrides and validation."""

from __future__ import annotations

from typing import Any

import pytest

from starlette_dream_ws import ConfigurationError, Settings

SECRET = "settings-test-secret-of-32-bytes-or-more"


def test_defaults() -> None:
    settings = Settings()
    assert settings.broadcast_url == "memory://"
    assert settings.heartbeat_interval == 30
    assert settings.heartbeat_timeout is None
    assert settings.effective_heartbeat_timeout == 60
    assert settings.jwt_algorithms == ("HS256",)
    assert settings.jwt_user_claim == "sub"
    assert settings.jwt_require_exp is True


def test_timeout_is_derived_from_the_interval_unless_given() -> None:
    assert Settings(heartbeat_interval=5).effective_heartbeat_timeout == 10
    assert Settings(heartbeat_interval=5, heartbeat_timeout=7).effective_heartbeat_timeout == 7


def test_from_env_reads_the_variables() -> None:
    environ = {
        "DREAM_WS_BROADCAST_URL": "redis://cache:6379/2",
        "DREAM_WS_JWT_SECRET": SECRET,
        "DREAM_WS_HEARTBEAT_INTERVAL": "15",
        "DREAM_WS_HEARTBEAT_TIMEOUT": "45.5",
        "DREAM_WS_PUBLISH_RETRIES": "3",
        "DREAM_WS_JWT_REQUIRE_EXP": "false",
        "DREAM_WS_JWT_AUDIENCE": "dream-ws",
        "UNRELATED": "ignored",
    }
    settings = Settings.from_env(environ)
    assert settings.broadcast_url == "redis://cache:6379/2"
    assert settings.jwt_secret == SECRET
    assert settings.jwt_key == SECRET
    assert settings.heartbeat_interval == 15.0
    assert isinstance(settings.heartbeat_interval, float)
    assert settings.heartbeat_timeout == 45.5
    assert settings.effective_heartbeat_timeout == 45.5
    assert settings.publish_retries == 3
    assert settings.jwt_require_exp is False
    assert settings.jwt_audience == "dream-ws"


def test_from_env_splits_the_algorithm_list() -> None:
    settings = Settings.from_env({"DREAM_WS_JWT_ALGORITHMS": "RS256, ES256", "DREAM_WS_JWT_PUBLIC_KEY": "PEM"})
    assert settings.jwt_algorithms == ("RS256", "ES256")
    assert settings.jwt_key == "PEM"


def test_from_env_with_nothing_set_gives_the_defaults() -> None:
    assert Settings.from_env({}) == Settings()
    # Empty variables count as unset.
    assert Settings.from_env({"DREAM_WS_HEARTBEAT_INTERVAL": "", "DREAM_WS_BROADCAST_URL": ""}) == Settings()


def test_from_env_uses_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DREAM_WS_HEARTBEAT_INTERVAL", "12")
    assert Settings.from_env().heartbeat_interval == 12


def test_keywords_override_the_environment() -> None:
    environ = {
        "DREAM_WS_BROADCAST_URL": "redis://cache:6379/2",
        "DREAM_WS_JWT_SECRET": "from-the-environment",
        "DREAM_WS_HEARTBEAT_INTERVAL": "15",
        "DREAM_WS_JWT_ALGORITHMS": "HS512",
    }
    settings = Settings.from_env(
        environ, broadcast_url="memory://", jwt_secret=SECRET, heartbeat_interval=20, jwt_algorithms="HS256, HS384"
    )
    assert settings.broadcast_url == "memory://"
    assert settings.jwt_secret == SECRET
    assert settings.heartbeat_interval == 20
    assert settings.jwt_algorithms == ("HS256", "HS384")
    assert Settings.from_env(environ, jwt_algorithms=["HS384"]).jwt_algorithms == ("HS384",)


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"broadcast_url": "amqp://localhost"}, id="unsupported scheme"),
        pytest.param({"broadcast_url": "localhost:6379"}, id="no scheme"),
        pytest.param({"jwt_algorithms": ("none",)}, id="none"),
        pytest.param({"jwt_algorithms": ("HS256", "none")}, id="none beside HS256"),
        pytest.param({"jwt_algorithms": ("HS256", "RS256")}, id="HS and RS mixed"),
        pytest.param({"jwt_algorithms": ("HS512", "ES256")}, id="HS and ES mixed"),
        pytest.param({"jwt_algorithms": ()}, id="no algorithm"),
        pytest.param({"heartbeat_interval": 30, "heartbeat_timeout": 30}, id="timeout equal to interval"),
        pytest.param({"heartbeat_interval": 30, "heartbeat_timeout": 10}, id="timeout below interval"),
        pytest.param({"heartbeat_interval": 0}, id="zero interval"),
        pytest.param({"publish_retries": -1}, id="negative retries"),
        pytest.param({"broadcast_url": "kafka://localhost:9092"}, id="kafka refused"),
        pytest.param({"broadcast_url": "redis-stream://host"}, id="redis-stream refused"),
        pytest.param({"broadcast_url": "nats://host"}, id="unknown scheme"),
    ],
)
def test_invalid_settings_raise_configuration_error(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        Settings(**kwargs)
    with pytest.raises(ConfigurationError):
        Settings.from_env({}, **kwargs)


def test_state_url_is_gone_every_backend_keeps_the_latest_state() -> None:
    with pytest.raises(ConfigurationError):
        Settings.from_env({}, state_url="redis://localhost")


def test_configuration_error_is_a_value_error() -> None:
    assert issubclass(ConfigurationError, ValueError)


@pytest.mark.parametrize("url", ["memory://", "redis://cache:6379/0", "rediss://cache", "postgres://db/dreams"])
def test_every_scheme_with_a_backend_is_accepted(url: str) -> None:
    assert Settings(broadcast_url=url).broadcast_url == url


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("DREAM_WS_HEARTBEAT_INTERVAL", "thirty-s3cr3t"),
        ("DREAM_WS_HEARTBEAT_TIMEOUT", "sixty-s3cr3t"),
        ("DREAM_WS_PUBLISH_RETRIES", "2.5-s3cr3t"),
        ("DREAM_WS_JWT_REQUIRE_EXP", "maybe-s3cr3t"),
    ],
)
def test_a_malformed_variable_is_named_but_its_value_never_echoed(variable: str, value: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        Settings.from_env({variable: value})
    assert variable in str(caught.value)
    assert value not in str(caught.value)
    assert "s3cr3t" not in repr(caught.value)
    # Nor in the chain a traceback would print.
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_an_unknown_keyword_is_refused() -> None:
    with pytest.raises(ConfigurationError) as caught:
        Settings.from_env({}, heartbeat_intervall=5)
    assert "heartbeat_intervall" in str(caught.value)


def test_jwt_key_needs_a_secret_for_hs_algorithms() -> None:
    settings = Settings()
    with pytest.raises(ConfigurationError):
        _ = settings.jwt_key
    with pytest.raises(ConfigurationError):
        _ = Settings(jwt_secret="").jwt_key
    assert Settings(jwt_secret=SECRET).jwt_key == SECRET


def test_jwt_key_needs_a_public_key_for_public_key_algorithms() -> None:
    settings = Settings(jwt_algorithms=("RS256",), jwt_secret=SECRET)
    with pytest.raises(ConfigurationError):
        _ = settings.jwt_key
    # The HMAC secret is never used as the key of a public-key algorithm.
    assert Settings(jwt_algorithms=("RS256",), jwt_secret=SECRET, jwt_public_key="PEM").jwt_key == "PEM"


def test_settings_are_frozen() -> None:
    settings = Settings()
    with pytest.raises(AttributeError):
        settings.heartbeat_interval = 1  # type: ignore[misc]


def test_env_settings_are_read_again_only_when_the_environment_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    from starlette_dream_ws.settings import env_settings

    monkeypatch.setenv("DREAM_WS_HEARTBEAT_INTERVAL", "12")
    first = env_settings()
    assert first.heartbeat_interval == 12
    assert env_settings() is first  # nothing changed: not parsed again
    monkeypatch.setenv("DREAM_WS_HEARTBEAT_INTERVAL", "13")
    assert env_settings().heartbeat_interval == 13
    monkeypatch.setenv("DREAM_WS_MAX_MESSAGE_SIZE", "1000")  # a variable that was not set before
    assert env_settings().max_message_size == 1000
    monkeypatch.delenv("DREAM_WS_HEARTBEAT_INTERVAL")
    assert env_settings().heartbeat_interval == Settings().heartbeat_interval
