"""Operations: liveness and readiness probes, the protected metrics endpoint and its two
renderings (prometheus-client and by hand), JSON log lines."""

from __future__ import annotations

import gc
import json
import logging
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount

from starlette_dream_ws import (
    ConfigurationError,
    DreamWebSocketApp,
    Settings,
    allow_any_authenticated_user,
    asend_image_update,
)
from starlette_dream_ws.groups.publishing import PublishMetrics
from starlette_dream_ws.server import probes
from starlette_dream_ws.server.logs import PACKAGE_LOGGER, JsonFormatter, configure_logging, log_event
from starlette_dream_ws.server.metrics import ConnectionMetrics, Figures, exposition, scrape_allowed
from starlette_dream_ws.testing import ConsumerTestClient
from tests.support.processes import free_port
from tests.support.tokens import UNIT_SECRET

MakeApp = Callable[..., DreamWebSocketApp]

pytestmark = pytest.mark.anyio

TOKEN = "metrics-token-for-the-unit-tests"


def _client(app: Any) -> httpx.AsyncClient:
    # No lifespan, as when the app is mounted: whatever connects, the request itself does.
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")


@pytest.fixture
async def unreachable() -> AsyncIterator[DreamWebSocketApp]:
    """An app whose Redis does not exist: nothing listens on the port."""
    app = DreamWebSocketApp(
        authorize=allow_any_authenticated_user,
        jwt_secret=UNIT_SECRET,
        broadcast_url=f"redis://127.0.0.1:{free_port()}/0",
        reconnect_backoff=0.01,
        publish_retries=0,
        publish_timeout=0.5,
    )
    yield app
    await app.close()


# -- probes ---------------------------------------------------------------------------------


async def test_liveness_answers_without_touching_the_backend(unreachable: DreamWebSocketApp) -> None:
    async with _client(unreachable) as http:
        response = await http.get("/health/live")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
    assert unreachable.layer.backend is None and not unreachable.layer.connected


async def test_readiness_fails_while_the_backend_is_unreachable(unreachable: DreamWebSocketApp) -> None:
    async with _client(unreachable) as http:
        ready = await http.get("/health/ready")
        alias = await http.get("/health")
        live = await http.get("/health/live")
    for response in (ready, alias):
        assert response.status_code == 503
        assert response.json()["status"] == "unavailable"
        assert response.json()["backend_connected"] is False
    # The orchestrator keeps the process: only its traffic is taken away.
    assert live.status_code == 200


async def test_readiness_connects_a_mounted_app_that_had_no_traffic(make_app: MakeApp) -> None:
    app = make_app()
    parent = Starlette(routes=[Mount("/ws", app)])  # Starlette never runs a mounted app's lifespan
    try:
        async with _client(parent) as http:
            ready = await http.get("/ws/health/ready")
            alias = await http.get("/ws/health")
            live = await http.get("/ws/health/live")
    finally:
        await app.close()
    assert ready.status_code == alias.status_code == 200
    assert ready.json() == alias.json()
    assert ready.json() == {
        "status": "ok",
        "backend_connected": True,
        "connections": 0,
        "backend_reconnects": 0,
        "slow_closed": 0,
        "dropped": 0,
    }
    assert live.json() == {"status": "ok"}


async def test_readiness_of_an_app_that_cannot_start_says_misconfigured(
    make_app: MakeApp, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app()

    async def start() -> None:
        raise ConfigurationError("jwt_secret (DREAM_WS_JWT_SECRET) is required for HS* algorithms")

    monkeypatch.setattr(app, "start", start)
    async with _client(app) as http:
        ready = await http.get("/health/ready")
        live = await http.get("/health/live")
    assert ready.status_code == 503
    assert ready.json()["status"] == "misconfigured"
    assert "jwt_secret" not in ready.text  # the reason goes to the log only
    assert any("jwt_secret" in r.getMessage() for r in caplog.records if r.name.startswith("starlette_dream_ws"))
    assert live.status_code == 200


# -- metrics endpoint -----------------------------------------------------------------------


async def test_metrics_stay_off_unless_enabled_even_with_a_token(make_app: MakeApp) -> None:
    async with ConsumerTestClient(make_app(metrics_token=TOKEN)) as client:
        response = await client.http.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 404


@pytest.mark.parametrize(
    "authorization",
    [None, f"Basic {TOKEN}", "Bearer wrong", f"Bearer {TOKEN}x", "Bearer", "Bearer ", f"Bearer {TOKEN[:-1]}"],
)
async def test_metrics_with_a_token_refuse_other_requests(make_app: MakeApp, authorization: str | None) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    async with ConsumerTestClient(make_app(metrics=True, metrics_token=TOKEN)) as client:
        response = await client.http.get("/metrics", headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert "dream_ws" not in response.text


async def test_metrics_with_a_token_answer_the_bearer(make_app: MakeApp) -> None:
    async with ConsumerTestClient(make_app(metrics=True, metrics_token=TOKEN)) as client:
        response = await client.http.get("/metrics", headers={"Authorization": f"bearer {TOKEN}"})
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert "dream_ws_connections_open 0" in response.text


def test_the_token_check() -> None:
    assert scrape_allowed(None, None)
    assert scrape_allowed(None, "anything")
    assert scrape_allowed(TOKEN, f"Bearer {TOKEN}")
    assert scrape_allowed(TOKEN, f"BEARER  {TOKEN} ")
    assert not scrape_allowed(TOKEN, None)
    # Characters outside ASCII are refused, not an error (compare_digest raises on such str).
    assert not scrape_allowed(TOKEN, "Bearer jeton-é")
    assert scrape_allowed("jeton-é", "Bearer jeton-é")
    # An empty token configured matches nothing, rather than every request without a token.
    assert not scrape_allowed("", "Bearer ")


# -- the two renderings ---------------------------------------------------------------------


def _figures() -> Figures:
    connections = ConnectionMetrics(accepted=10_000, messages_in=123_456, messages_out=987_654, slow_closed=3)
    connections.closed.update({1000: 9_000, 1001: 950, 1013: 3, 4401: 40, 4403: 7})
    publishing = PublishMetrics(published=5_000, retries=4, failures=1)
    for seconds in (0.0004, 0.002, 0.004, 0.03, 0.03, 0.7, 3.0, 12.5):
        publishing.seconds.observe(seconds)
    return Figures(connections, publishing, open_connections=42, backend_connected=True, backend_reconnects=2)


def _parsed(text: str) -> dict[str, tuple[str, str, list[tuple[str, tuple[tuple[str, str], ...], float]]]]:
    """Family name -> (type, help, samples sorted), as Prometheus reads the text."""
    parser = pytest.importorskip("prometheus_client.parser")
    return {
        family.name: (
            family.type,
            family.documentation,
            sorted((s.name, tuple(sorted(s.labels.items())), s.value) for s in family.samples),
        )
        for family in parser.text_string_to_metric_families(text)
    }


def test_both_renderings_parse_to_the_same_samples() -> None:
    prometheus = pytest.importorskip("starlette_dream_ws.server.prometheus")
    figures = _figures()
    by_hand = exposition(figures)
    through_client = prometheus.render(prometheus.private_registry(prometheus.DreamWsCollector(lambda: figures)))
    assert by_hand != through_client  # two writers (`3` and `3.0`, say), one meaning
    assert _parsed(by_hand) == _parsed(through_client)
    families = _parsed(by_hand)
    assert len(families) == 13
    closed = families["dream_ws_connections_closed"][2]
    assert ("dream_ws_connections_closed_total", (("code", "4401"),), 40) in closed
    buckets = {dict(labels)["le"]: v for name, labels, v in families["dream_ws_publish_duration_seconds"][2] if labels}
    assert buckets["0.001"] == 1 and buckets["0.05"] == 5 and buckets["10.0"] == 7 and buckets["+Inf"] == 8


def test_a_family_without_samples_renders_the_same() -> None:
    prometheus = pytest.importorskip("starlette_dream_ws.server.prometheus")
    figures = Figures(
        ConnectionMetrics(), PublishMetrics(), open_connections=0, backend_connected=False, backend_reconnects=0
    )
    through_client = prometheus.render(prometheus.private_registry(prometheus.DreamWsCollector(lambda: figures)))
    assert _parsed(exposition(figures)) == _parsed(through_client)


async def test_an_app_renders_through_prometheus_client_when_installed(make_app: MakeApp) -> None:
    pytest.importorskip("prometheus_client")
    app = make_app(metrics=True)
    async with ConsumerTestClient(app) as client:
        async with client.connect("/dreams/5") as ws:
            assert (await ws.receive_json())["type"] == "connection_established"
            await asend_image_update(5, status="completed")
            await ws.receive_json()
            served = (await client.http.get("/metrics")).text
            by_hand = exposition(probes.figures(app))
    assert "dream_ws_connections_accepted_total 1.0" in served  # prometheus-client writes floats
    assert _parsed(served) == _parsed(by_hand)


async def test_without_prometheus_client_the_text_is_written_by_hand(
    make_app: MakeApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As if the `prometheus` extra were not installed: importing it fails.
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    monkeypatch.delitem(sys.modules, "starlette_dream_ws.server.prometheus", raising=False)
    app = make_app(metrics=True)
    async with ConsumerTestClient(app) as client:
        response = await client.http.get("/metrics")
        by_hand = exposition(probes.figures(app))
    assert response.status_code == 200
    assert "dream_ws_connections_accepted_total 0\n" in response.text
    assert response.text == by_hand
    with pytest.raises(ImportError, match=r"starlette-dream-ws\[prometheus\]"):
        app.prometheus_collector()


async def test_the_collector_reads_the_counters_at_each_scrape(make_app: MakeApp) -> None:
    prometheus_client = pytest.importorskip("prometheus_client")
    app = make_app()
    collector = app.prometheus_collector()
    assert app.prometheus_collector() is collector
    registry = prometheus_client.CollectorRegistry()
    registry.register(collector)
    assert registry.get_sample_value("dream_ws_messages_sent_total") == 0
    app.context.metrics.messages_out += 5
    app.context.metrics.closed[1000] += 2
    assert registry.get_sample_value("dream_ws_messages_sent_total") == 5
    assert registry.get_sample_value("dream_ws_connections_closed_total", {"code": "1000"}) == 2
    # The names are fixed: a second app in the same registry would repeat every series.
    with pytest.raises(ValueError, match="Duplicated"):
        registry.register(make_app().prometheus_collector())


def test_a_collector_outliving_its_app_yields_nothing(make_app: MakeApp) -> None:
    pytest.importorskip("prometheus_client")
    app = make_app()
    collector = app.prometheus_collector()
    del app
    gc.collect()
    assert list(collector.collect()) == []


# -- JSON logs ------------------------------------------------------------------------------


@pytest.fixture
def package_logger() -> Iterator[logging.Logger]:
    """The component's logger, restored afterwards (configure_logging changes process state)."""
    package = logging.getLogger(PACKAGE_LOGGER)
    saved = (list(package.handlers), package.propagate, package.level)
    yield package
    package.handlers[:] = saved[0]
    package.propagate, package.level = saved[1], saved[2]


def _record(**kwargs: Any) -> logging.LogRecord:
    record = logging.LogRecord("starlette_dream_ws.consumer", logging.WARNING, __file__, 1, "%s", ("x",), None)
    record.__dict__.update(kwargs)
    return record


def test_the_json_formatter_writes_one_object_per_record() -> None:
    record = _record(
        msg="connected path=%s user=%s",
        args=("/dreams/5", "u5"),
        dream_ws={"event": "connected", "path": "/dreams/5", "user": "u5", "level": "not this one"},
    )
    line = JsonFormatter().format(record)
    assert "\n" not in line
    fields = json.loads(line)
    assert fields.pop("time").endswith("+00:00")
    assert fields == {
        "level": "WARNING",
        "logger": "starlette_dream_ws.consumer",
        "event": "connected",
        "path": "/dreams/5",
        "user": "u5",
        "message": "connected path=/dreams/5 user=u5",
    }


def test_the_json_formatter_writes_exceptions_as_text_and_no_token() -> None:
    try:
        raise RuntimeError("GET /ws/dreams/1?token=secret.jwt.value failed")
    except RuntimeError:
        record = _record(exc_info=sys.exc_info(), msg="handshake of /ws/dreams/1?token=secret.jwt.value", args=())
    fields = json.loads(JsonFormatter().format(record))
    assert fields["event"] is None  # a line that is no event of ours
    assert isinstance(fields["exc_info"], str) and "RuntimeError" in fields["exc_info"]
    assert "secret" not in json.dumps(fields)
    assert "token=[redacted]" in fields["message"]


def test_configure_logging_json_adds_one_handler_and_leaves_root_alone(package_logger: logging.Logger) -> None:
    root = logging.getLogger()
    root_state = (list(root.handlers), root.level)
    before = list(package_logger.handlers)
    for _ in range(3):
        configure_logging(Settings(log_format="json"))
    added = [h for h in package_logger.handlers if h not in before]
    assert len(added) == 1 and isinstance(added[0].formatter, JsonFormatter)
    assert package_logger.propagate is False
    assert (list(root.handlers), root.level) == root_state


def test_configure_logging_text_changes_nothing(package_logger: logging.Logger) -> None:
    state = (list(package_logger.handlers), package_logger.propagate, package_logger.level)
    configure_logging(Settings(log_format="text"))
    assert (list(package_logger.handlers), package_logger.propagate, package_logger.level) == state


async def test_json_log_lines_of_a_connection(
    package_logger: logging.Logger, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DREAM_WS_LOG_FORMAT", "json")
    app = DreamWebSocketApp(authorize=allow_any_authenticated_user, jwt_secret=UNIT_SECRET)
    DreamWebSocketApp(authorize=allow_any_authenticated_user, jwt_secret=UNIT_SECRET)  # a second app: no second handler
    async with ConsumerTestClient(app) as client:
        token = client.token("u5")
        async with client.connect("/dreams/5", token=token) as ws:
            await ws.receive_json()
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    connected = [line for line in lines if line["event"] == "connected"]
    assert len(connected) == 1  # one handler: one line per record
    assert connected[0]["path"] == "/dreams/5" and connected[0]["user"] == "u5"
    assert connected[0]["logger"] == "starlette_dream_ws.consumer" and connected[0]["level"] == "INFO"
    assert {line["event"] for line in lines} >= {"connected", "closed"}
    assert all(token not in json.dumps(line) for line in lines)


def test_log_event_fields_reach_the_json_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=PACKAGE_LOGGER)
    log_event({"path": "/dreams/1"}, "u1", "refused", logging.ERROR, reason="origin_not_allowed")
    fields = json.loads(JsonFormatter().format(caplog.records[-1]))
    assert fields["event"] == "refused" and fields["reason"] == "origin_not_allowed" and fields["user"] == "u1"
    assert (
        fields["level"] == "ERROR" and fields["message"] == "refused path=/dreams/1 reason=origin_not_allowed user=u1"
    )
