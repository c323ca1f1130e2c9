"""Every setting of the component: keyword arguments, `DREAM_WS_*` variables, validated once."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from typing import Any

ENV_PREFIX = "DREAM_WS_"

# Algorithms PyJWT verifies. "none" is deliberately absent: it can never be allowed.
SYMMETRIC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)


class ConfigurationError(ValueError):
    """A setting is missing or invalid; raised at construction, before anything runs."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """Configuration of one app (and of the producers in a process).

    Build it with `Settings.from_env(**overrides)`: keywords win over `DREAM_WS_<NAME>`
    variables, which win over the defaults below.
    """

    #: Groups backend: `memory://` (one process), `redis://host:6379/0` or `postgresql://...`
    #: (many processes). The schemes are mapped to backends in `groups/backends/__init__.py`.
    broadcast_url: str = "memory://"
    #: Seconds a group's history (and so its latest state) is kept after its last update.
    state_ttl: float = 86400.0
    #: Recent messages kept per group, delivered to a server that missed them while reconnecting.
    history_size: int = 100

    jwt_secret: str | None = None
    #: PEM public key for RS*/PS*/ES*/EdDSA tokens.
    jwt_public_key: str | None = None
    jwt_algorithms: tuple[str, ...] = ("HS256",)
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    jwt_leeway: float = 0.0
    jwt_user_claim: str = "sub"
    jwt_require_exp: bool = True

    heartbeat_interval: float = 30.0
    #: Silence after which a connection is closed with 4408; default 2 x interval.
    heartbeat_timeout: float | None = None

    #: Events waiting to be sent to one connection; past this the client is too slow (1013).
    max_pending_events: int = 1000
    #: Seconds a server-side close may wait for a client that does not read; past it the
    #: connection is dropped without its close frame (its task ends, its buffers are freed).
    close_timeout: float = 10.0
    #: Largest client frame accepted, in bytes (1009 past it).
    max_message_size: int = 64 * 1024
    #: Client messages per second per connection on average, and the burst allowed above it.
    #: Over it, messages are dropped with an `error`; `message_burst` drops in a row close with 1008.
    max_messages_per_second: float = 10.0
    message_burst: int = 20
    #: Open connections per app (normally one app per process) and per user (1013 past them).
    max_connections: int = 20_000
    max_connections_per_user: int = 32
    #: Origins browsers may connect from: exact origins (`https://app.example`), or `*` for any.
    #: Empty: only pages of the host the WebSocket is served from. No Origin (not a browser): allowed.
    allowed_origins: tuple[str, ...] = ()

    #: Publish attempts after the first one, and their backoff (seconds, doubling, capped).
    publish_retries: int = 8
    publish_backoff: float = 0.1
    publish_backoff_max: float = 2.0
    #: Seconds one publish attempt may take.
    publish_timeout: float = 5.0

    #: Seconds between reconnect attempts to a lost backend (doubling up to 1 s).
    reconnect_backoff: float = 0.1

    #: Serve Prometheus metrics at `<mount>/metrics` (off: the figures are the integrator's to expose).
    metrics: bool = False
    #: When set, `<mount>/metrics` answers only requests with `Authorization: Bearer <metrics_token>`.
    metrics_token: str | None = None
    #: Serve the AsyncAPI 3.0 document of the app's consumers at `<mount>/asyncapi.json`.
    asyncapi: bool = False
    #: `text` (one `event key=value` line) or `json` (one JSON object per line, for log shippers).
    log_format: str = "text"

    def __post_init__(self) -> None:
        from .groups.backends import unsupported  # here: the groups package imports settings

        problem = unsupported(self.broadcast_url)
        if problem is not None:
            raise ConfigurationError(problem)
        algorithms = set(self.jwt_algorithms)
        if not algorithms:
            raise ConfigurationError("jwt_algorithms must name at least one algorithm")
        unknown = algorithms - SYMMETRIC_ALGORITHMS - ASYMMETRIC_ALGORITHMS
        if unknown:
            raise ConfigurationError(f"jwt_algorithms has algorithms that are not allowed: {sorted(unknown)}")
        if algorithms & SYMMETRIC_ALGORITHMS and algorithms & ASYMMETRIC_ALGORITHMS:
            # One key for both families is the classic key-confusion attack.
            raise ConfigurationError("jwt_algorithms must not mix HMAC (HS*) and public-key algorithms")
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is None:
                continue
            kind = str(field.type)
            if kind.startswith(("float", "int")) and (
                isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value)
            ):
                raise ConfigurationError(f"{field.name} must be a finite number")
            if kind.startswith("str") and not isinstance(value, str):
                raise ConfigurationError(f"{field.name} must be a string")
        positive = ("heartbeat_interval", "state_ttl", "publish_timeout", "publish_backoff", "reconnect_backoff")
        for name in (*positive, "close_timeout"):
            if getattr(self, name) <= 0:
                raise ConfigurationError(f"{name} must be positive")
        if self.heartbeat_timeout is not None and self.heartbeat_timeout <= self.heartbeat_interval:
            raise ConfigurationError("heartbeat_timeout must be longer than heartbeat_interval")
        counts = ("max_pending_events", "max_message_size", "history_size", "message_burst", "max_connections")
        for name in (*counts, "max_connections_per_user"):
            if getattr(self, name) < 1:
                raise ConfigurationError(f"{name} must be at least 1")
        if self.log_format not in ("text", "json"):
            raise ConfigurationError("log_format must be 'text' or 'json'")
        if self.publish_retries < 0 or self.max_messages_per_second <= 0:
            raise ConfigurationError("publish_retries must be >= 0 and max_messages_per_second positive")

    @property
    def effective_heartbeat_timeout(self) -> float:
        return self.heartbeat_timeout if self.heartbeat_timeout is not None else 2 * self.heartbeat_interval

    @property
    def jwt_key(self) -> str:
        """The verification key for the configured algorithm family."""
        if set(self.jwt_algorithms) & ASYMMETRIC_ALGORITHMS:
            if not self.jwt_public_key:
                raise ConfigurationError("public-key algorithms need jwt_public_key (DREAM_WS_JWT_PUBLIC_KEY)")
            return self.jwt_public_key
        if not self.jwt_secret:
            raise ConfigurationError("jwt_secret (DREAM_WS_JWT_SECRET) is required for HS* algorithms")
        return self.jwt_secret

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read `DREAM_WS_<NAME>` variables, then apply keyword overrides."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            raw = environ.get(ENV_PREFIX + field.name.upper())
            if raw is not None and raw != "":
                values[field.name] = _parse(field.name, str(field.type), raw)
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigurationError(f"unknown settings: {sorted(unknown)}")
        values.update(overrides)
        if isinstance(values.get("jwt_algorithms"), str):
            values["jwt_algorithms"] = _split(values["jwt_algorithms"])
        elif "jwt_algorithms" in values:
            values["jwt_algorithms"] = tuple(values["jwt_algorithms"])
        return cls(**values)


#: The variables `Settings.from_env` reads.
_ENV_NAMES = tuple(ENV_PREFIX + field.name.upper() for field in dataclasses.fields(Settings))
#: The last settings read from the environment: the names of the variables that were set, a
#: key saying what the environment looked like, and the settings.
_env_cache: tuple[tuple[str, ...], tuple[object, ...], Settings] | None = None


def env_settings() -> Settings:
    """`Settings.from_env()`, parsed again only when the environment has changed: producers
    without an app read it for every update, and parsing costs more than a publish.

    A change is seen through the values of the variables that were set and the number of
    variables (a new `DREAM_WS_*` one adds to it), without a lookup of every possible name
    (most are absent, and a missing key costs an exception each)."""
    global _env_cache
    environ = os.environ
    cached = _env_cache
    if cached is not None:
        names, key, settings = cached
        if key == (len(environ), *map(environ.get, names)):
            return settings
    names = tuple(name for name in _ENV_NAMES if name in environ)
    settings = Settings.from_env()
    _env_cache = (names, (len(environ), *map(environ.get, names)), settings)
    return settings


def _split(raw: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.split(",") if part.strip())


def _parse(name: str, annotation: str, raw: str) -> Any:
    try:
        if annotation.startswith("bool"):
            if raw.lower() in {"1", "true", "yes", "on"}:
                return True
            if raw.lower() in {"0", "false", "no", "off"}:
                return False
            raise ValueError(raw)
        if annotation.startswith("int"):
            return int(raw)
        if annotation.startswith("float"):
            return float(raw)
        if annotation.startswith("tuple"):
            return _split(raw)
    except ValueError:
        # Never echo the value: it may be a secret.
        raise ConfigurationError(f"{ENV_PREFIX}{name.upper()} is not a valid {annotation}") from None
    return raw
