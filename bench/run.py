"""Run the benchmark scenarios against our stack, Django Channels and the bare-ASGI ceiling.

    python bench/run.py                      # every scenario, every stack (a few minutes)
    python bench/run.py --smoke              # tiny sizes: proves the scripts work (seconds)
    python bench/run.py --stacks ours,ceiling --scenarios fanout,throughput_sync
    python bench/run.py --json-out results.json && python bench/chart.py results.json

For each stack: a fresh Redis server and one uvicorn worker on 127.0.0.1 (started and stopped by
the tests' process harness, `tests/support/`), then each scenario with the load client
(`load_client.py`) and the publisher (`publisher_process.py`) as separate processes. Prints one
JSON object per scenario and stack, then a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import jwt

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.redis import RedisServer  # noqa: E402
from tests.support.uvicorn import UvicornServer  # noqa: E402

SECRET = "bench-secret-0123456789abcdef-0123456789abcdef"
#: Every stack, in table order. `ours-granian` (our app on Granian) only when Granian is installed.
ALL_STACKS = ("ours", "ours-granian", "channels", "ceiling", "ceiling-tasks", "sse-starlette")
HAVE_GRANIAN = importlib.util.find_spec("granian") is not None
#: What runs without `--stacks`.
STACKS = tuple(s for s in ALL_STACKS if s != "ours-granian" or HAVE_GRANIAN)
APPS = {
    "ours": "bench.servers.ours:app",
    "ours-granian": "bench.servers.ours:app",
    "channels": "bench.servers.channels_app.asgi:application",
    "ceiling": "bench.servers.ceiling:app",
    "ceiling-tasks": "bench.servers.ceiling_tasks:app",
    "sse-starlette": "bench.servers.sse_starlette_app:app",
}
#: The same uvicorn for every stack: its fastest WebSocket implementation, uvloop, no compression.
UVICORN_OPTIONS = [
    "--loop",
    "uvloop",
    "--http",
    "httptools",
    "--ws",
    "websockets-sansio",
    "--ws-per-message-deflate",
    "false",
    "--no-access-log",
    "--backlog",
    "4096",
]
UVICORN_LOG_LEVEL = "warning"
#: Each stack runs exactly one heartbeat. Ours is the protocol's own (a JSON `ping` every
#: `heartbeat_interval`, 30 s by default), so uvicorn's WebSocket pings, which would only repeat
#: it, are off, as docs/deployment.md recommends; the others have none of their own and keep uvicorn's
#: (every 20 s by default).
STACK_OPTIONS = {
    "ours": ["--ws-ping-interval", "0"],
    "channels": [],
    "ceiling": [],
    "ceiling-tasks": [],
    "sse-starlette": [],
}
#: Granian, as close to the uvicorn options as it goes: one worker, uvloop, the ASGI interface
#: (its WebSocket pings are off by default; ours are the protocol's own).
GRANIAN_OPTIONS = ["--interface", "asgi", "--loop", "uvloop", "--workers", "1", "--backlog", "4096", "--no-access-log"]
HEARTBEAT_SECONDS = {
    "ours": 30.0,
    "ours-granian": 30.0,
    "channels": 20.0,
    "ceiling": 20.0,
    "ceiling-tasks": 20.0,
    "sse-starlette": 30.0,
}
SCENARIOS = (
    "idle",
    "handshake",
    "fanout",
    "fanout_slow",
    "spread",
    "throughput_sync",
    "throughput_async",
    "sse_idle",
    "sse_fanout",
    "resume",
)
#: Names that stand for several scenarios on the command line.
ALIASES = {"throughput": ("throughput_sync", "throughput_async")}
#: The stacks each scenario runs on: WebSocket ones on the WebSocket stacks, event streams on
#: ours and the sse-starlette baseline, resuming on ours only (the others cannot). The old
#: ceiling (a task per connection) only where it tells something: the throughput scenarios.
WEBSOCKET_STACKS = ("ours", "ours-granian", "channels", "ceiling")
#: Scenarios that start on a fresh server process.
FRESH_SERVER = frozenset({"idle", "sse_idle"})
SCENARIO_STACKS = {
    **dict.fromkeys(("idle", "handshake", "fanout", "fanout_slow", "spread"), WEBSOCKET_STACKS),
    **dict.fromkeys(("throughput_sync", "throughput_async"), (*WEBSOCKET_STACKS, "ceiling-tasks")),
    "sse_idle": ("ours", "sse-starlette"),
    "sse_fanout": ("ours", "sse-starlette"),
    "resume": ("ours",),
}
#: How long delivery may stall before the rest counts as lost.
DRAIN_TIMEOUT = 10.0
#: How long delivery may go on after the last publish, however slowly: what has not arrived by
#: then counts as lost, and every scenario stays under a minute.
MAX_DRAIN = 40.0


@dataclasses.dataclass
class Sizes:
    idle_clients: int = 10_000
    idle_dreams: int = 1_000
    #: Seconds the idle CPU is measured over; None: one heartbeat period of the stack, so that
    #: every connection is pinged once in it, whenever it was opened.
    idle_window: float | None = None
    handshake_clients: int = 5_000
    fanout_clients: int = 1_000
    fanout_rate: float = 10.0
    fanout_updates: int = 100
    #: The same fan-out at the pace of a slow job: each update finds the server idle.
    fanout_slow_rate: float = 2.0
    fanout_slow_updates: int = 40
    spread_clients: int = 2_000
    spread_dreams: int = 1_000
    spread_updates: int = 2_000
    spread_rate: float = 200.0
    throughput_dreams: int = 100
    throughput_clients_per_dream: int = 10
    throughput_seconds: float = 10.0
    throughput_concurrency: int = 100
    resume_clients: int = 1_000
    resume_behind: int = 100


SMOKE = Sizes(
    idle_clients=200,
    idle_dreams=20,
    idle_window=1.0,
    handshake_clients=200,
    fanout_clients=50,
    fanout_rate=50.0,
    fanout_updates=20,
    fanout_slow_rate=20.0,
    fanout_slow_updates=10,
    spread_clients=40,
    spread_dreams=20,
    spread_updates=40,
    spread_rate=200.0,
    throughput_dreams=10,
    throughput_clients_per_dream=5,
    throughput_seconds=1.0,
    throughput_concurrency=10,
    resume_clients=50,
    resume_behind=20,
)


def token() -> str:
    return jwt.encode({"sub": "bench", "exp": int(time.time()) + 86_400}, SECRET, algorithm="HS256")


def proc_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def process_tree(pid: int) -> list[int]:
    """`pid` and its living descendants: Granian serves from a worker process under its own."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(parent, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, ()))
    return tree


def tree_cpu_seconds(pid: int) -> float:
    total = 0.0
    for member in process_tree(pid):
        with contextlib.suppress(OSError):
            total += proc_cpu_seconds(member)
    return total


def tree_rss_kib(pid: int) -> int:
    total = 0
    for member in process_tree(pid):
        with contextlib.suppress(OSError, RuntimeError):
            total += proc_rss_kib(member)
    return total


class GranianServer(UvicornServer):
    """`granian` serving a stack's app, run by the same harness as uvicorn. Ready when the app
    answers HTTP (any status): Granian listens before its worker has loaded the app."""

    name = "granian"

    def command(self) -> list[str]:
        args = [sys.executable, "-m", "granian", "--host", "127.0.0.1", "--port", str(self.port)]
        return [*args, "--log-level", self.log_level, *self.options, self.app]

    def is_ready(self) -> bool:
        return self.health(timeout=1.0) is not None


class Server:
    """One uvicorn worker serving a stack's app (the tests' `UvicornServer`), started at once."""

    def __init__(self, stack: str, redis: RedisServer, workdir: Path) -> None:
        self.stack = stack
        self.redis = redis
        env = {
            "BENCH_REDIS_URL": redis.url,
            "BENCH_JWT_SECRET": SECRET,
            "DJANGO_SETTINGS_MODULE": "bench.servers.channels_app.settings",
            "PYTHONPATH": str(ROOT),
        }
        if stack == "ours-granian":
            server_class, options = GranianServer, GRANIAN_OPTIONS
        else:
            server_class, options = UvicornServer, [*UVICORN_OPTIONS, *STACK_OPTIONS[stack]]
        self.uvicorn = server_class(
            env,
            APPS[stack],
            app_dir=ROOT,
            cwd=ROOT,
            workdir=workdir / stack,
            options=options,
            log_level=UVICORN_LOG_LEVEL,
            # Not every stack has `/health`, and uvicorn's start-up line is an INFO one.
            ready_when="port",
        )
        self.uvicorn.start(timeout=30)

    def url(self) -> str:
        return self.uvicorn.ws_url("/dreams/{dream}")

    def events_url(self) -> str:
        return f"{self.uvicorn.base_url}/dreams/{{dream}}/events"

    def cpu_seconds(self) -> float:
        return tree_cpu_seconds(self.uvicorn.pid)

    def rss_kib(self) -> int:
        return tree_rss_kib(self.uvicorn.pid)

    async def settle(self, timeout: float = 30.0) -> None:
        """Until the server is at rest (under a tenth of a core over half a second): what one
        scenario left to do (closing thousands of connections) must not weigh on the next."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            before = self.cpu_seconds()
            await asyncio.sleep(0.5)  # measuring: a window of CPU time
            if self.cpu_seconds() - before < 0.05:
                return

    def redis_cpu_seconds(self) -> float:
        process = self.redis.process
        return proc_cpu_seconds(process.pid) if process is not None else 0.0

    def close(self) -> None:
        """SIGTERM; SIGKILL if it has not exited 10 s later."""
        self.uvicorn.stop(timeout=10)


class LoadClient:
    """The load client process, driven over its stdin and stdout."""

    def __init__(self, process: asyncio.subprocess.Process, ready: dict[str, Any]) -> None:
        self.process = process
        self.ready = ready

    @classmethod
    async def start(
        cls, server: Server, clients: int, dreams: int, first_dream: int, *, sse: bool = False, query: str = ""
    ) -> LoadClient:
        """`sse`: event streams (`sse_client.py`) instead of WebSockets; `query` is added to the URL."""
        url = server.events_url() if sse else server.url()
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            str(ROOT / "bench" / ("sse_client.py" if sse else "load_client.py")),
            "--url",
            url + (f"?{query}" if query else ""),
            "--clients",
            str(clients),
            "--dreams",
            str(dreams),
            "--first-dream",
            str(first_dream),
            "--token",
            token(),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=1 << 24,
        )
        client = cls(process, {})
        client.ready = await client._event("ready", timeout=120)
        if client.ready.get("failed"):
            await client.close()
            raise RuntimeError(
                f"{server.stack}: {client.ready['failed']} of {clients} connections failed: {client.ready}"
            )
        return client

    async def _event(self, name: str, timeout: float) -> dict[str, Any]:
        assert self.process.stdout is not None
        while True:
            line = await asyncio.wait_for(self.process.stdout.readline(), timeout)
            if not line:
                raise RuntimeError(f"the load client exited ({await self.process.wait()}) before {name!r}")
            event: dict[str, Any] = json.loads(line)
            if event.get("event") == name:
                return event

    async def command(self, name: str, answer: str, timeout: float = 60) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(f"{name}\n".encode())
        await self.process.stdin.drain()
        return await self._event(answer, timeout)

    async def received(self) -> int:
        return int((await self.command("stats", "stats"))["received"])

    async def wait_for(self, expected: int) -> int:
        """Until `expected` updates arrived, none arrived for DRAIN_TIMEOUT, or MAX_DRAIN has
        passed; the count."""
        last, since = -1, time.monotonic()
        deadline = since + MAX_DRAIN
        while True:
            count = await self.received()
            if count >= expected or time.monotonic() > deadline:
                return count
            if count != last:
                last, since = count, time.monotonic()
            elif time.monotonic() - since > DRAIN_TIMEOUT:
                return count
            await asyncio.sleep(0.1)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.command("close", "closed", timeout=60)
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()
        await self.process.wait()


async def publish(stack: str, redis_url: str, *args: str, mode: str = "sync") -> dict[str, Any]:
    """The publisher process, to its end. `mode`: the stack's sync producer (what a Celery
    worker calls, the default) or its async one."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(ROOT / "bench" / "publisher_process.py"),
        "--stack",
        stack,
        "--mode",
        mode,
        "--redis-url",
        redis_url,
        *args,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    out, _ = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"publisher for {stack} exited with {process.returncode}")
    result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return result


def expected_deliveries(published: dict[str, Any], clients: int, dreams: int, first_dream: int) -> int:
    watchers = {first_dream + d: clients // dreams + (1 if d < clients % dreams else 0) for d in range(dreams)}
    return sum(n * watchers.get(int(dream), 0) for dream, n in published["published_per_dream"].items())


@contextlib.asynccontextmanager
async def measured(server: Server) -> AsyncIterator[dict[str, float]]:
    """Server and Redis CPU seconds and wall time of the block."""
    figures: dict[str, float] = {}
    cpu, redis_cpu, wall = server.cpu_seconds(), server.redis_cpu_seconds(), time.monotonic()
    yield figures
    figures["server_cpu_seconds"] = round(server.cpu_seconds() - cpu, 3)
    figures["redis_cpu_seconds"] = round(server.redis_cpu_seconds() - redis_cpu, 3)
    figures["wall_seconds"] = round(time.monotonic() - wall, 3)


def latency_figures(report: dict[str, Any]) -> dict[str, Any]:
    latency = report.get("latency_ms") or {}
    return {f"latency_ms_{k}": latency.get(k) for k in ("p50", "p95", "p99", "max")}


async def delivery(
    server: Server,
    redis_url: str,
    sizes_clients: int,
    dreams: int,
    first_dream: int,
    publisher_args: list[str],
    *,
    sse: bool = False,
    mode: str = "sync",
) -> dict[str, Any]:
    client = await LoadClient.start(server, sizes_clients, dreams, first_dream, sse=sse)
    try:
        client_cpu = float(client.ready["cpu_seconds"])
        async with measured(server) as figures:
            published = await publish(
                server.stack,
                redis_url,
                "--dreams",
                str(dreams),
                "--first-dream",
                str(first_dream),
                *publisher_args,
                mode=mode,
            )
            expected = expected_deliveries(published, sizes_clients, dreams, first_dream)
            received = await client.wait_for(expected)
        report = await client.command("report", "report")
    finally:
        await client.close()
    return {
        "clients": sizes_clients,
        "dreams": dreams,
        "producer": mode,
        "published": published["published"],
        "publish_failures": published["failed"],
        "publishes_per_second": published["publishes_per_second"],
        "expected": expected,
        "delivered": received,
        "lost": expected - received,
        **latency_figures(report),
        "out_of_order": report.get("out_of_order"),
        "closed_by_server": report.get("closed_by_server"),
        "first_publish": published["started"],
        "last_receive": report.get("last_receive"),
        **figures,
        "client_cpu_seconds": round(float(report["cpu_seconds"]) - client_cpu, 3),
        "publisher_cpu_seconds": published["cpu_seconds"],
        "producer_cpu_us_per_publish": published["cpu_us_per_publish"],
        "server_cpu_us_per_delivered": round(1e6 * figures["server_cpu_seconds"] / received, 2) if received else None,
    }


async def fanout(server: Server, redis_url: str, sizes: Sizes) -> dict[str, Any]:
    args = ["--rate", str(sizes.fanout_rate), "--count", str(sizes.fanout_updates)]
    result = await delivery(server, redis_url, sizes.fanout_clients, 1, 200_000, args)
    return {"rate_per_second": sizes.fanout_rate, **result}


async def fanout_slow(server: Server, redis_url: str, sizes: Sizes) -> dict[str, Any]:
    args = ["--rate", str(sizes.fanout_slow_rate), "--count", str(sizes.fanout_slow_updates)]
    result = await delivery(server, redis_url, sizes.fanout_clients, 1, 250_000, args)
    return {"rate_per_second": sizes.fanout_slow_rate, **result}


async def spread(server: Server, redis_url: str, sizes: Sizes) -> dict[str, Any]:
    args = ["--rate", str(sizes.spread_rate), "--count", str(sizes.spread_updates)]
    result = await delivery(server, redis_url, sizes.spread_clients, sizes.spread_dreams, 300_000, args)
    return {"rate_per_second": sizes.spread_rate, **result}


async def throughput(server: Server, redis_url: str, sizes: Sizes, mode: str) -> dict[str, Any]:
    """Flat out for `throughput_seconds`: `sync`, one caller of the stack's sync producer (a
    Celery worker publishing as fast as it can); `async`, `throughput_concurrency` publishes in
    flight on the async producer."""
    clients = sizes.throughput_dreams * sizes.throughput_clients_per_dream
    args = ["--duration", str(sizes.throughput_seconds), "--concurrency", str(sizes.throughput_concurrency)]
    first_dream = 400_000 if mode == "sync" else 450_000
    result = await delivery(server, redis_url, clients, sizes.throughput_dreams, first_dream, args, mode=mode)
    span = (result["last_receive"] or result["first_publish"]) - result["first_publish"]
    result["delivered_per_second"] = round(result["delivered"] / span) if span > 0 else 0
    return result


async def throughput_sync(server: Server, redis_url: str, sizes: Sizes) -> dict[str, Any]:
    return await throughput(server, redis_url, sizes, "sync")


async def throughput_async(server: Server, redis_url: str, sizes: Sizes) -> dict[str, Any]:
    return await throughput(server, redis_url, sizes, "async")


async def sse_fanout(server: Server, redis_url: str, sizes: Sizes) -> dict[str, Any]:
    args = ["--rate", str(sizes.fanout_rate), "--count", str(sizes.fanout_updates)]
    result = await delivery(server, redis_url, sizes.fanout_clients, 1, 210_000, args, sse=True)
    return {"rate_per_second": sizes.fanout_rate, **result}


async def sse_idle(server: Server, redis_url: str, sizes: Sizes) -> dict[str, Any]:
    return await idle(server, redis_url, sizes, sse=True)


async def resume(server: Server, redis_url: str, sizes: Sizes) -> dict[str, Any]:
    """A reconnect storm: `resume_clients` clients come back at once, each `resume_behind` updates
    behind (`since` = the dream's epoch, seq 0): the time until every one has caught up."""
    dream = 500_000
    published = await publish(
        server.stack, redis_url, "--first-dream", str(dream), "--rate", "1000", "--count", str(sizes.resume_behind)
    )
    import redis as redis_client

    from starlette_dream_ws.groups.backends.redis import keys

    with redis_client.Redis.from_url(redis_url) as client:
        epoch = client.hget(keys(f"dream_images_{dream}")[0], "epoch")
    assert epoch is not None, "the publisher gave the dream no position"
    expected = sizes.resume_clients * published["published"]
    async with measured(server) as figures:
        started = time.monotonic()
        load = await LoadClient.start(server, sizes.resume_clients, 1, dream, query=f"since={epoch.decode()}:0")
        try:
            received = await load.wait_for(expected)
            caught_up = time.monotonic() - started
            report = await load.command("report", "report")
        finally:
            await load.close()
    return {
        "clients": sizes.resume_clients,
        "behind": published["published"],
        "expected": expected,
        "delivered": received,
        "lost": expected - received,
        "out_of_order": report.get("out_of_order"),
        "closed_by_server": report.get("closed_by_server"),
        "connect_seconds": load.ready["connect_seconds"],
        "caught_up_seconds": round(caught_up, 3),
        **figures,
    }


async def idle(server: Server, redis_url: str, sizes: Sizes, *, sse: bool = False) -> dict[str, Any]:
    warm = await LoadClient.start(server, 10, 10, 90_000, sse=sse)  # imports, backend connection, first groups
    await warm.close()
    base = server.rss_kib()
    client = await LoadClient.start(server, sizes.idle_clients, sizes.idle_dreams, 1, sse=sse)
    try:
        with_idle = server.rss_kib()
        async with measured(server) as figures:
            window = sizes.idle_window or HEARTBEAT_SECONDS[server.stack]
            await asyncio.sleep(window)  # measuring: nothing to wait for but time
        after_window = server.rss_kib()
        report = await client.command("report", "report")
    finally:
        await client.close()
    return {
        "connections": sizes.idle_clients,
        "dreams": sizes.idle_dreams,
        "open_after_window": report.get("connections_open"),
        "closed_by_server": report.get("closed_by_server"),
        "server_rss_kib_base": base,
        "server_rss_kib_idle": with_idle,
        "server_rss_kib_after_window": after_window,
        "kib_per_connection": round((max(with_idle, after_window) - base) / sizes.idle_clients, 2),
        "idle_cpu_percent_of_a_core": round(100 * figures["server_cpu_seconds"] / figures["wall_seconds"], 2),
        **figures,
    }


async def handshake(server: Server, redis_url: str, sizes: Sizes) -> dict[str, Any]:
    cpu = server.cpu_seconds()
    client = await LoadClient.start(server, sizes.handshake_clients, sizes.handshake_clients, 100_000)
    server_cpu = server.cpu_seconds() - cpu
    await client.close()
    seconds = float(client.ready["connect_seconds"])
    return {
        "connections": sizes.handshake_clients,
        "connect_seconds": round(seconds, 3),
        "connections_per_second": round(sizes.handshake_clients / seconds),
        "server_cpu_seconds": round(server_cpu, 3),
        "client_cpu_seconds": client.ready["cpu_seconds"],
    }


Scenario = Callable[[Server, str, Sizes], Coroutine[Any, Any, dict[str, Any]]]
RUNNERS: dict[str, Scenario] = {
    "idle": idle,
    "handshake": handshake,
    "fanout": fanout,
    "fanout_slow": fanout_slow,
    "spread": spread,
    "throughput_sync": throughput_sync,
    "throughput_async": throughput_async,
    "sse_idle": sse_idle,
    "sse_fanout": sse_fanout,
    "resume": resume,
}


async def run(stacks: list[str], scenarios: list[str], sizes: Sizes) -> list[dict[str, Any]]:
    results = []
    with tempfile.TemporaryDirectory(prefix="dream-ws-bench-") as tmp:
        for stack in stacks:
            mine = [name for name in scenarios if stack in SCENARIO_STACKS[name]]
            if not mine:
                continue
            # A fresh Redis per stack: nothing one leaves behind (streams, groups) weighs on the next.
            with RedisServer(workdir=Path(tmp) / f"redis-{stack}") as redis:
                server = Server(stack, redis, Path(tmp))
                try:
                    for index, name in enumerate(mine):
                        if name in FRESH_SERVER and index > 0:
                            # Memory per connection is only readable from a process that has not
                            # held (and freed) other scenarios' connections before.
                            server.close()
                            server = Server(stack, redis, Path(tmp) / name)
                        await server.settle()
                        started = time.monotonic()
                        figures = await RUNNERS[name](server, redis.url, sizes)
                        result = {"scenario": name, "stack": stack, **figures}
                        result["scenario_seconds"] = round(time.monotonic() - started, 1)
                        print(json.dumps(result), flush=True)
                        results.append(result)
                finally:
                    server.close()
    return results


# -- the table ---------------------------------------------------------------------------------

ROWS: list[tuple[str, str, str, str]] = [
    # (scenario, key, label, better)
    ("fanout", "latency_ms_p50", "fan-out 1x1000 @10/s: latency p50 (ms)", "lower"),
    ("fanout", "latency_ms_p95", "fan-out 1x1000 @10/s: latency p95 (ms)", "lower"),
    ("fanout", "latency_ms_p99", "fan-out 1x1000 @10/s: latency p99 (ms)", "lower"),
    ("fanout", "delivered", "fan-out @10/s: delivered", ""),
    ("fanout", "expected", "fan-out @10/s: expected", ""),
    ("fanout", "server_cpu_seconds", "fan-out @10/s: server CPU s", "lower"),
    ("fanout", "server_cpu_us_per_delivered", "fan-out @10/s: server CPU µs per delivered", "lower"),
    ("fanout", "client_cpu_seconds", "fan-out @10/s: client CPU s", ""),
    ("fanout_slow", "latency_ms_p50", "fan-out 1x1000 @2/s: latency p50 (ms)", "lower"),
    ("fanout_slow", "latency_ms_p99", "fan-out 1x1000 @2/s: latency p99 (ms)", "lower"),
    ("fanout_slow", "delivered", "fan-out @2/s: delivered", ""),
    ("fanout_slow", "server_cpu_us_per_delivered", "fan-out @2/s: server CPU µs per delivered", "lower"),
    ("spread", "latency_ms_p50", "spread 2000/1000: latency p50 (ms)", "lower"),
    ("spread", "latency_ms_p99", "spread 2000/1000: latency p99 (ms)", "lower"),
    ("spread", "delivered", "spread: delivered", ""),
    ("spread", "expected", "spread: expected", ""),
    ("spread", "server_cpu_seconds", "spread: server CPU s", "lower"),
    *(
        row
        for mode in ("sync", "async")
        for row in (
            (f"throughput_{mode}", "delivered_per_second", f"throughput 100x10 {mode}: delivered msgs/s", "higher"),
            (f"throughput_{mode}", "publishes_per_second", f"throughput {mode}: publishes/s", "higher"),
            (f"throughput_{mode}", "producer_cpu_us_per_publish", f"throughput {mode}: producer CPU µs/pub", "lower"),
            (
                f"throughput_{mode}",
                "server_cpu_us_per_delivered",
                f"throughput {mode}: server CPU µs/delivered",
                "lower",
            ),
            (f"throughput_{mode}", "lost", f"throughput {mode}: lost", "lower"),
            (f"throughput_{mode}", "latency_ms_p99", f"throughput {mode}: latency p99 (ms)", "lower"),
            (f"throughput_{mode}", "server_cpu_seconds", f"throughput {mode}: server CPU s", ""),
            (f"throughput_{mode}", "client_cpu_seconds", f"throughput {mode}: client CPU s", ""),
            (f"throughput_{mode}", "redis_cpu_seconds", f"throughput {mode}: Redis CPU s", ""),
        )
    ),
    ("idle", "kib_per_connection", "idle 10k: KiB per connection", "lower"),
    ("idle", "idle_cpu_percent_of_a_core", "idle 10k: server CPU % of a core", "lower"),
    ("handshake", "connect_seconds", "handshake: seconds for 5000", "lower"),
    ("handshake", "connections_per_second", "handshake: connections/s", "higher"),
    ("sse_idle", "kib_per_connection", "SSE idle 10k: KiB per stream", "lower"),
    ("sse_idle", "idle_cpu_percent_of_a_core", "SSE idle 10k: server CPU % of a core", "lower"),
    ("sse_fanout", "latency_ms_p99", "SSE fan-out 1x1000: latency p99 (ms)", "lower"),
    ("sse_fanout", "delivered", "SSE fan-out: delivered", ""),
    ("sse_fanout", "server_cpu_seconds", "SSE fan-out: server CPU s", "lower"),
    ("resume", "caught_up_seconds", "resume storm 1000 x 100 behind: seconds until all caught up", "lower"),
    ("resume", "delivered", "resume storm: delivered", ""),
    ("resume", "server_cpu_seconds", "resume storm: server CPU s", "lower"),
]


def table(results: list[dict[str, Any]]) -> str:
    """Rows of figures, a column per stack; then every figure of ours (and of ours on Granian)
    as a fraction of the ceiling's (for throughput, above 1 would beat it; for latency and CPU,
    below 1), and ours against Channels (how many times better; below 1 is worse)."""
    by = {(r["scenario"], r["stack"]): r for r in results}
    stacks = [s for s in ALL_STACKS if any(r["stack"] == s for r in results)]
    ceiling = "ceiling" in stacks
    mine = [s for s in ("ours", "ours-granian") if s in stacks] if ceiling else []
    versus_channels = "ours" in stacks and "channels" in stacks
    header = ["", *stacks, *(f"{s} / ceiling" for s in mine)]
    if versus_channels:
        header.append("ours vs Channels")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for scenario, key, label, better in ROWS:
        values = {stack: by.get((scenario, stack), {}).get(key) for stack in stacks}
        if all(value is None for value in values.values()):
            continue
        row = [label, *(_fmt(values[stack]) for stack in stacks)]
        row += [_ratio(values[s], values["ceiling"]) for s in mine]
        if versus_channels:
            ours, theirs = values["ours"], values["channels"]
            if better == "higher":
                row.append(_times(ours, theirs))
            elif better == "lower":
                row.append(_times(theirs, ours))
            else:
                row.append("")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _ratio(numerator: object, denominator: object) -> str:
    if isinstance(numerator, int | float) and isinstance(denominator, int | float) and denominator:
        return f"{numerator / denominator:.2f}"
    return ""


def _times(numerator: object, denominator: object) -> str:
    if isinstance(numerator, int | float) and isinstance(denominator, int | float) and denominator:
        return f"{numerator / denominator:.1f}x"
    return ""


def _fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.2f}" if value < 100 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def machine() -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    system = f"{platform.system()} {platform.release()}"
    return f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, {system}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stacks", default=",".join(STACKS), help=f"of {', '.join(ALL_STACKS)}")
    parser.add_argument(
        "--scenarios", default=",".join(SCENARIOS), help=f"of {', '.join(SCENARIOS)} ('throughput': both)"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to check that everything runs")
    parser.add_argument("--json-out", type=Path, help="also write every result to this file")
    args = parser.parse_args()
    stacks = [s for s in args.stacks.split(",") if s]
    scenarios = [name for s in args.scenarios.split(",") if s for name in ALIASES.get(s, (s,))]
    for name in stacks:
        if name not in ALL_STACKS:
            parser.error(f"unknown stack {name!r}")
        if name == "ours-granian" and not HAVE_GRANIAN:
            parser.error("ours-granian needs Granian: pip install granian")
    for name in scenarios:
        if name not in SCENARIOS:
            parser.error(f"unknown scenario {name!r}")
    if args.smoke and args.stacks == parser.get_default("stacks"):
        # The smoke run proves the scripts work in about a minute: Granian serves the same app,
        # so it is left to full runs and to an explicit `--stacks`.
        stacks = [s for s in stacks if s != "ours-granian"]
    sizes = SMOKE if args.smoke else Sizes()
    results = asyncio.run(run(stacks, scenarios, sizes))
    print()
    print(f"Machine: {machine()}")
    print()
    print(table(results))
    if args.json_out:
        args.json_out.write_text(json.dumps({"machine": machine(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
