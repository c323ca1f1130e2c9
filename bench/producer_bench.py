"""What one publish costs the producer: ours against the same work done bare, on one Redis.

    python bench/producer_bench.py                     # N=5000 publishes per case, median of 3 runs
    python bench/producer_bench.py -n 20000 --postgres  # also the PostgreSQL cases
    python bench/producer_bench.py --profile bench-producer.pstats  # cProfile of ours (sync)
    python bench/producer_bench.py --py-spy bench-producer.svg      # py-spy flame graph of it

Cases, each publishing N `image_update`s round 100 dreams, timed with `time.process_time()`
(CPU of this whole process, every thread: ours may use a thread of its own) and the wall clock:

* `bare-script`: a bare redis-py sync client running the very script ours runs per publish
  (`_PUBLISH` with `keys()` of `starlette_dream_ws.groups.backends.redis`, the same ARGV: a new
  epoch, ttl ms, history size, channel, message), the update built with `json.dumps`: the
  ceiling's sync producer, the least a publish with history can cost in Python;
* `ours-sync`: `send_image_update(...)` in a loop, as a Celery task calls it;
* `bare-publish`: a bare redis-py `PUBLISH` of the JSON (no history: for reference only);
* `ours-async`: `asend_image_update(...)` from 64 concurrent callers on uvloop;
* with `--postgres` (an embedded PostgreSQL): `bare-pg` a bare asyncpg loop running our
  backend's publish statements (next position + insert + pg_notify, trim, purge) in one
  transaction, against `ours-sync-pg`, `send_image_update` with the `postgresql://` URL.

Prints CPU µs per publish and publishes/s per case, and the ratios the targets are set on
(ours_sync / bare_script CPU: at most 1.5).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.servers.ceiling import SyncCeilingPublisher, channel_name, update_json  # noqa: E402
from starlette_dream_ws import Settings, asend_image_update, send_image_update  # noqa: E402
from starlette_dream_ws.producers import close_producers  # noqa: E402
from tests.support.redis import RedisServer  # noqa: E402

DREAMS = 100
FIRST_DREAM = 700_000
CONCURRENCY = 64
RUNS = 3
TARGET_SYNC_RATIO = 1.5

Figures = dict[str, float]


def dream(i: int) -> int:
    return FIRST_DREAM + i % DREAMS


def timed(run: Callable[[], None], n: int) -> Figures:
    cpu, wall = time.process_time(), time.perf_counter()
    run()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return {"cpu_us": 1e6 * cpu / n, "per_second": n / wall}


def bare_script(url: str, n: int) -> Figures:
    publisher = SyncCeilingPublisher(url)
    publisher.publish(dream(0), None)  # connects and loads the script, outside the figures
    try:
        return timed(lambda: [publisher.publish(dream(i), str(i)) for i in range(n)] and None, n)
    finally:
        publisher.close()


def bare_publish(url: str, n: int) -> Figures:
    import redis

    client = redis.Redis.from_url(url, single_connection_client=True)
    client.ping()
    try:
        return timed(
            lambda: [client.publish(channel_name(dream(i)), update_json(dream(i), str(i))) for i in range(n)] and None,
            n,
        )
    finally:
        client.close()


def ours_sync(url: str, n: int) -> Figures:
    settings = Settings(broadcast_url=url)
    send_image_update(dream(0), status="processing", settings=settings)  # connects, outside the figures

    def run() -> None:
        for i in range(n):
            send_image_update(dream(i), status="processing", message=str(i), settings=settings)

    return timed(run, n)


def ours_async(url: str, n: int) -> Figures:
    import uvloop

    settings = Settings(broadcast_url=url)

    async def main() -> Figures:
        from starlette_dream_ws.producers import aclose_producers

        await asend_image_update(dream(0), status="processing", settings=settings)
        counter = iter(range(n))

        async def caller() -> None:
            for i in counter:
                await asend_image_update(dream(i), status="processing", message=str(i), settings=settings)

        cpu, wall = time.process_time(), time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(CONCURRENCY)))
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        await aclose_producers()
        return {"cpu_us": 1e6 * cpu / n, "per_second": n / wall}

    return uvloop.run(main())


def bare_pg(url: str, n: int) -> Figures:
    import asyncpg
    import uvloop

    from starlette_dream_ws.groups.backends import postgres

    # The backend's own statements (the class was renamed once; either name will do).
    statements = getattr(postgres, "HistorySQL", None) or postgres._HistorySQL
    sql = statements("dream_ws_messages")
    ttl, history = 86_400.0, 100

    async def main() -> Figures:
        connection = await asyncpg.connect(url)
        await connection.execute(sql.create)
        epochs = (f"b{os.getpid()}-{i}" for i in range(n + 1))

        async def one(i: int) -> None:
            channel = channel_name(dream(i))
            async with connection.transaction():
                row = await connection.fetchrow(
                    sql.publish, [channel], next(epochs), ttl, 1, update_json(dream(i), str(i))
                )
                await connection.execute(sql.trim, channel, row["epoch"], row["seq"], history)
                await connection.execute(sql.purge)

        await one(0)
        cpu, wall = time.process_time(), time.perf_counter()
        for i in range(n):
            await one(i)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        await connection.close()
        return {"cpu_us": 1e6 * cpu / n, "per_second": n / wall}

    return uvloop.run(main())


def medians(runs: int, cases: dict[str, Callable[[], Figures]]) -> dict[str, Figures]:
    """Each case's median over `runs`, the cases taking turns within each run: on a shared
    machine the load drifts, and turns spread the drift over every case alike."""
    measured: dict[str, list[Figures]] = {name: [] for name in cases}
    for _ in range(runs):
        for name, measure in cases.items():
            measured[name].append(measure())
    return {
        name: {key: statistics.median(r[key] for r in results) for key in results[0]}
        for name, results in measured.items()
    }


def profile(url: str, n: int, path: Path) -> None:
    profiler = cProfile.Profile()
    profiler.runcall(ours_sync, url, n)
    profiler.dump_stats(path)
    print(f"\ncProfile of ours-sync written to {path}; the top of it by own time:")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(20)


def py_spy(url: str, n: int, path: Path) -> None:
    binary = shutil.which("py-spy")
    if binary is None:
        raise SystemExit("py-spy is not installed: pip install py-spy")
    command = [sys.executable, __file__, "--only", "ours-sync", "-n", str(n), "--runs", "1", "--redis-url", url]
    subprocess.run([binary, "record", "--rate", "500", "--output", str(path), "--", *command], check=True)
    print(f"py-spy profile of ours-sync written to {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=5000, help="publishes per case and run")
    parser.add_argument("--runs", type=int, default=RUNS)
    parser.add_argument("--postgres", action="store_true", help="also the PostgreSQL cases (an embedded server)")
    parser.add_argument("--only", help="one case, by name")
    parser.add_argument("--redis-url", help="an existing Redis instead of a fresh one")
    parser.add_argument("--profile", type=Path, help="write a cProfile of ours-sync to this file")
    parser.add_argument("--py-spy", type=Path, help="write a py-spy flame graph (SVG) of ours-sync to this file")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dream-ws-producer-bench-") as tmp:
        if args.redis_url:
            run(args, args.redis_url, Path(tmp))
        else:
            with RedisServer(workdir=Path(tmp) / "redis") as redis_server:
                run(args, redis_server.url, Path(tmp))


def run(args: argparse.Namespace, url: str, tmp: Path) -> None:
    cases: dict[str, Callable[[], Figures]] = {
        "bare-script": lambda: bare_script(url, args.n),
        "ours-sync": lambda: ours_sync(url, args.n),
        "bare-publish": lambda: bare_publish(url, args.n),
        "ours-async": lambda: ours_async(url, args.n),
    }
    postgres: Any = None
    try:
        if args.postgres and args.only in (None, "bare-pg", "ours-sync-pg"):
            from tests.support.postgres import PostgresServer

            postgres = PostgresServer(workdir=tmp / "postgres")
            postgres.start()
            pg_url = postgres.url
            cases["bare-pg"] = lambda: bare_pg(pg_url, args.n)
            cases["ours-sync-pg"] = lambda: ours_sync(pg_url, args.n)
        chosen = {name: measure for name, measure in cases.items() if not args.only or name == args.only}
        results = medians(args.runs, chosen)
    finally:
        # Our producers' connections closed before the server they are on goes.
        close_producers()
        if postgres is not None:
            postgres.stop()
    for name, figures in results.items():
        print(f"{name:>13}: {figures['cpu_us']:8.1f} µs CPU/publish  {figures['per_second']:9,.0f} publishes/s")
    ratios = {
        "ours_sync_cpu / bare_script_cpu": ("ours-sync", "bare-script"),
        "ours_async_cpu / bare_script_cpu": ("ours-async", "bare-script"),
        "bare_script_cpu / bare_publish_cpu": ("bare-script", "bare-publish"),
        "ours_sync_pg_cpu / bare_pg_cpu": ("ours-sync-pg", "bare-pg"),
    }
    computed = {
        label: results[a]["cpu_us"] / results[b]["cpu_us"]
        for label, (a, b) in ratios.items()
        if a in results and b in results
    }
    for label, value in computed.items():
        target = f"  (target <= {TARGET_SYNC_RATIO})" if label.startswith("ours_sync_cpu") else ""
        print(f"{label}: {value:.2f}{target}")
    if args.json_out:
        args.json_out.write_text(json.dumps({"n": args.n, "runs": args.runs, "cases": results, "ratios": computed}))
    if args.profile:
        profile(url, args.n, args.profile)
    if args.py_spy:
        py_spy(url, args.n, args.py_spy)


if __name__ == "__main__":
    main()
