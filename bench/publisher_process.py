"""The publishing process of the benchmark: one stack's producer, at a fixed rate or flat out.

    python bench/publisher_process.py --stack ours --redis-url redis://127.0.0.1:6379 --dreams 100 --rate 50 --count 500
    python bench/publisher_process.py --stack ours --redis-url ... --dreams 100 --duration 10 --concurrency 32

Update i goes to dream `first_dream + i % dreams` and carries its sequence number for that dream
in `message`, so that the client can check order. Prints one JSON object when done.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.stack_publishers import STACKS, Publisher, open_publisher

#: A dream nobody watches, for the unmeasured first publish.
WARM_UP_DREAM = 10**9


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Plan:
    """Hands out (dream, sequence) pairs in order, and counts what was published."""

    def __init__(self, dreams: int, first_dream: int) -> None:
        self.dreams = dreams
        self.first_dream = first_dream
        self.issued = 0
        self.published: Counter[int] = Counter()
        self.failed = 0

    def next(self) -> tuple[int, str]:
        dream = self.first_dream + self.issued % self.dreams
        sequence = self.issued // self.dreams
        self.issued += 1
        return dream, str(sequence)

    async def publish(self, publisher: Publisher) -> None:
        dream, sequence = self.next()
        try:
            await publisher.publish(dream, sequence)
        except Exception as exc:
            self.failed += 1
            print(f"publish failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        else:
            self.published[dream] += 1


async def at_rate(publisher: Publisher, plan: Plan, rate: float, count: int) -> None:
    """`count` updates, one every 1/rate s on a fixed schedule (late ones go at once, no burst after)."""
    started = time.monotonic()
    for i in range(count):
        delay = started + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        await plan.publish(publisher)


async def flat_out(publisher: Publisher, plan: Plan, duration: float, concurrency: int) -> None:
    """As many updates as `concurrency` publishers in flight manage in `duration` seconds.

    A dream's updates go out one after another (each worker owns whole dreams), so that their
    order is the order the client must see.
    """
    deadline = time.monotonic() + duration
    workers = min(concurrency, plan.dreams)

    async def worker(index: int) -> None:
        owned = list(range(plan.first_dream + index, plan.first_dream + plan.dreams, workers))
        sequence = 0
        while time.monotonic() < deadline:
            for dream in owned:
                try:
                    await publisher.publish(dream, str(sequence))
                except Exception as exc:
                    plan.failed += 1
                    print(f"publish failed: {type(exc).__name__}: {exc}", file=sys.stderr)
                else:
                    plan.published[dream] += 1
            sequence += 1

    await asyncio.gather(*(worker(i) for i in range(workers)))


async def main(args: argparse.Namespace) -> dict[str, object]:
    publisher = await open_publisher(args.stack, args.redis_url)
    plan = Plan(args.dreams, args.first_dream)
    try:
        await publisher.publish(WARM_UP_DREAM, None)  # connects, outside the figures
        cpu_before, started = cpu_seconds(), time.time()
        if args.duration is not None:
            await flat_out(publisher, plan, args.duration, args.concurrency)
        else:
            await at_rate(publisher, plan, args.rate, args.count)
        finished = time.time()
    finally:
        await publisher.aclose()
    return {
        "event": "published",
        "stack": args.stack,
        "published": sum(plan.published.values()),
        "published_per_dream": {str(dream): n for dream, n in sorted(plan.published.items())},
        "failed": plan.failed,
        "started": started,
        "finished": finished,
        "publishes_per_second": round(sum(plan.published.values()) / max(finished - started, 1e-9), 1),
        "cpu_seconds": round(cpu_seconds() - cpu_before, 3),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stack", choices=STACKS, required=True)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--dreams", type=int, default=1)
    parser.add_argument("--first-dream", type=int, default=1)
    parser.add_argument("--rate", type=float, default=10.0, help="updates per second (fixed-rate mode)")
    parser.add_argument("--count", type=int, default=100, help="updates to publish (fixed-rate mode)")
    parser.add_argument("--duration", type=float, help="publish flat out for this many seconds instead")
    parser.add_argument("--concurrency", type=int, default=32, help="publishes in flight (flat-out mode)")
    arguments = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(main(arguments))
    else:
        result = uvloop.run(main(arguments))
    print(json.dumps(result), flush=True)
