"""Sizing figures for docs/deployment.md: memory per idle connection, fan-out latency, producer rate.

    python bench/sizing.py [--clients 2000] [--fanout 500]

Starts a Redis server and one uvicorn worker on 127.0.0.1 (the tests' helpers, tests/support/),
connects the clients from this process, publishes from a separate producer process, and prints
one JSON object. Bounded: about 30 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jwt
from websockets.asyncio.client import connect

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.producers import run_producer  # noqa: E402
from tests.support.redis import RedisServer  # noqa: E402
from tests.support.uvicorn import UvicornServer  # noqa: E402

SECRET = "sizing-secret-0123456789abcdef-0123456789abcdef"
#: uvicorn options, by its UVICORN_* environment variables (set by --ws/--deflate below).
UVICORN_ENV: dict[str, str] = {}


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime + stime, in clock ticks of 1/100 s


async def open_clients(server: UvicornServer, dream: int, count: int, token: str) -> list:
    clients = []
    for start in range(0, count, 100):
        batch = await asyncio.gather(
            *(
                connect(
                    server.ws_url(f"/dreams/{dream}"),
                    subprotocols=["dream-ws.v1", f"dream-ws.bearer.{token}"],
                    ping_interval=None,
                    max_queue=None,
                )
                for _ in range(min(100, count - start))
            )
        )
        for ws in batch:
            assert json.loads(await ws.recv())["type"] == "connection_established"
        clients += batch
    return clients


async def main(idle: int, fanout: int, updates: int) -> dict[str, object]:
    token = jwt.encode({"sub": "admin", "exp": int(time.time()) + 3600}, SECRET, algorithm="HS256")
    figures: dict[str, object] = {"python": sys.version.split()[0], "uvicorn": UVICORN_ENV}
    with tempfile.TemporaryDirectory() as tmp, RedisServer(workdir=Path(tmp) / "redis") as redis:
        env = {
            "DREAM_WS_BROADCAST_URL": redis.url,
            "DREAM_WS_JWT_SECRET": SECRET,
            # one user holds every connection here
            "DREAM_WS_MAX_CONNECTIONS_PER_USER": "1000000",
            **UVICORN_ENV,
        }
        server = UvicornServer(env, "served_app:app", workdir=Path(tmp) / "uvicorn")
        server.start()
        try:
            pid = server.pid
            warm = await open_clients(server, 1, 10, token)  # the layer connects on first use
            base = rss_kib(pid)
            started = time.monotonic()
            idle_clients = await open_clients(server, 2, idle, token)
            opened = time.monotonic() - started
            with_idle = rss_kib(pid)
            cpu_before, wall_before = cpu_seconds(pid), time.monotonic()
            await asyncio.sleep(5)  # measuring the idle server's CPU over 5 s
            idle_cpu = (cpu_seconds(pid) - cpu_before) / (time.monotonic() - wall_before)
            figures |= {
                "idle_connections": idle,
                "server_rss_kib_base": base,
                "server_rss_kib_with_idle": with_idle,
                "kib_per_idle_connection": round((with_idle - base) / idle, 1),
                "idle_cpu_fraction_of_a_core": round(idle_cpu, 4),
                "connections_opened_per_second": round(idle / opened),
            }
            for ws in idle_clients:
                await ws.close()

            watchers = await open_clients(server, 3, fanout, token)
            received: list[list[float]] = [[] for _ in watchers]

            async def read(ws, into: list[float]) -> None:  # type: ignore[no-untyped-def]
                while len(into) < updates:
                    message = json.loads(await asyncio.wait_for(ws.recv(), 30))
                    if message["type"] == "image_update":
                        into.append(time.time() - message["timestamp"])

            readers = [asyncio.create_task(read(ws, into)) for ws, into in zip(watchers, received, strict=True)]
            calls = [
                {"dream_id": 3, "image_urls": [], "status": "processing", "message": str(i), "pause_before": 0.02}
                for i in range(updates)
            ]
            produced = time.monotonic()
            outcomes = await asyncio.to_thread(run_producer, redis.url, calls, None, 120.0)
            producer_seconds = time.monotonic() - produced
            await asyncio.wait_for(asyncio.gather(*readers), 60)
            latencies = sorted(x for into in received for x in into)
            figures |= {
                "fanout_clients": fanout,
                "fanout_updates": updates,
                "delivered": len(latencies),
                "expected": fanout * updates,
                "latency_ms_p50": round(1000 * statistics.median(latencies), 2),
                "latency_ms_p99": round(1000 * latencies[int(len(latencies) * 0.99) - 1], 2),
                "producer_calls_ok": sum(o == {"ok": True} for o in outcomes),
            }
            for ws in watchers + warm:
                await ws.close()
            rate_calls = [{"dream_id": 4, "image_urls": [], "status": "completed", "message": None}] * 2000
            started = time.monotonic()
            await asyncio.to_thread(run_producer, redis.url, rate_calls, None, 120.0)
            figures["sync_producer_calls_per_second_incl_process_start"] = round(2000 / (time.monotonic() - started))
            del producer_seconds
        finally:
            server.close()
    return figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=2000, help="idle connections for the memory figure")
    parser.add_argument("--fanout", type=int, default=500, help="clients watching one dream")
    parser.add_argument("--updates", type=int, default=100, help="updates published to them")
    parser.add_argument("--ws", default="auto", help="uvicorn's WebSocket implementation")
    parser.add_argument("--deflate", action=argparse.BooleanOptionalAction, default=True, help="permessage-deflate")
    args = parser.parse_args()
    UVICORN_ENV |= {"UVICORN_WS": args.ws, "UVICORN_WS_PER_MESSAGE_DEFLATE": str(args.deflate).lower()}
    print(json.dumps(asyncio.run(main(args.clients, args.fanout, args.updates)), indent=2))
