"""Publishing to a six-node Redis Cluster (`redis+cluster://`) against one Redis, on this machine.

    python bench/cluster_publish.py               # N=5000 publishes per case, best of 3 runs
    python bench/cluster_publish.py -n 20000 --groups 10000

Cases, each publishing N `image_update`s round 300 dreams (spread over every shard):

* `async`: one process, `asend_image_update(...)` from 64 concurrent callers on one event loop
  (the backend pipelines them: one pipeline per shard per batch);
* `sync`: `send_image_update(...)` in a loop, as a Celery task calls it (one Redis: the sync
  client of the calling thread; a cluster: the producer's background loop);

on one Redis, on the cluster, and on the cluster without WAIT (`?replica_wait_ms=0`).

Then subscriptions: G groups (`dream_images_<n>`, n = 1..G) subscribed by one backend, in the
layer's batches of 500: the time it takes, and how many land on each shard (counted by the
shards themselves, `PUBSUB SHARDNUMSUB`), with the skew max/mean of groups per shard.

The cluster is three primaries with one replica each (WAIT for the replica after each pipeline
of publishes, as the backend does by default), all on this one machine: its figures are about
the client side and the cost of WAIT, not about the extra CPU a real cluster brings.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from starlette_dream_ws import Settings, asend_image_update, send_image_update  # noqa: E402
from starlette_dream_ws.groups.backends import create_backend  # noqa: E402
from starlette_dream_ws.groups.backends.redis_cluster_nodes import pubsub_channel  # noqa: E402
from starlette_dream_ws.groups.subscriptions import MAX_BATCH  # noqa: E402
from starlette_dream_ws.producers import aclose_producers, close_producers  # noqa: E402
from starlette_dream_ws.protocol import dream_group  # noqa: E402
from tests.support.redis import RedisServer  # noqa: E402
from tests.support.redis_cluster import RedisClusterServers  # noqa: E402

DREAMS = 300
FIRST_DREAM = 800_000
CONCURRENCY = 64
RUNS = 3


def dream(i: int) -> int:
    return FIRST_DREAM + i % DREAMS


def timed(run: Callable[[], None], n: int) -> float:
    """Publishes per second."""
    started = time.perf_counter()
    run()
    return n / (time.perf_counter() - started)


def sync_case(url: str, n: int) -> float:
    settings = Settings(broadcast_url=url)
    send_image_update(dream(0), status="processing", settings=settings)  # connects, outside the figures

    def run() -> None:
        for i in range(n):
            send_image_update(dream(i), status="processing", message=str(i), settings=settings)

    try:
        return timed(run, n)
    finally:
        close_producers()


def async_case(url: str, n: int) -> float:
    settings = Settings(broadcast_url=url)

    async def main() -> float:
        try:
            await asend_image_update(dream(0), status="processing", settings=settings)
            counter = iter(range(n))

            async def caller() -> None:
                for i in counter:
                    await asend_image_update(dream(i), status="processing", message=str(i), settings=settings)

            started = time.perf_counter()
            async with asyncio.TaskGroup() as group:
                for _ in range(CONCURRENCY):
                    group.create_task(caller())
            return n / (time.perf_counter() - started)
        finally:
            await aclose_producers()

    return asyncio.run(main())


def subscriptions(cluster: RedisClusterServers, groups: int) -> dict[str, Any]:
    names = [dream_group(n) for n in range(1, groups + 1)]

    # Counted by the shards while the backend is subscribed.
    counts: dict[int, int] = {}

    async def counted() -> float:
        backend = create_backend(cluster.url)
        await backend.connect()
        try:
            started = time.perf_counter()
            for start in range(0, len(names), MAX_BATCH):
                await backend.subscribe(names[start : start + MAX_BATCH])
            seconds = time.perf_counter() - started
            for node in cluster.primaries():
                with node.client() as client:
                    reply = client.execute_command("PUBSUB", "SHARDNUMSUB", *(pubsub_channel(n) for n in names))
                pairs = reply.items() if isinstance(reply, dict) else zip(reply[::2], reply[1::2], strict=True)
                counts[node.port] = sum(1 for _, subscribers in pairs if int(subscribers) > 0)
            return seconds
        finally:
            await backend.disconnect()

    seconds = asyncio.run(counted())
    per_shard = list(counts.values())
    mean = statistics.mean(per_shard)
    return {
        "groups": groups,
        "subscribe_seconds": round(seconds, 3),
        "per_shard": per_shard,
        "skew_max_over_mean": round(max(per_shard) / mean, 3),
    }


def best(case: Callable[[str, int], float], url: str, n: int) -> float:
    return max(case(url, n) for _ in range(RUNS))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=5000, help="publishes per case and run")
    parser.add_argument("--groups", type=int, default=3000, help="groups subscribed for the per-shard count")
    args = parser.parse_args()
    results: dict[str, Any] = {}
    with RedisServer() as single, RedisClusterServers() as cluster:
        # Without WAIT: what waiting for the replica costs.
        cases = (
            ("single", single.url),
            ("cluster", cluster.url),
            ("cluster_nowait", f"{cluster.url}?replica_wait_ms=0"),
        )
        for name, url in cases:
            for case_name, case in (("async", async_case), ("sync", sync_case)):
                results[f"{name}_{case_name}_per_second"] = round(best(case, url, args.n))
                print(f"{name:14} {case_name:6} {results[f'{name}_{case_name}_per_second']:>8} publishes/s", flush=True)
        results["cluster_subscriptions"] = subscriptions(cluster, args.groups)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
