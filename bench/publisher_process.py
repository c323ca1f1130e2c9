"""The publishing process of the benchmark: one stack's producer, at a fixed rate or flat out.

    python bench/publisher_process.py --stack ours --redis-url redis://127.0.0.1:6379 --dreams 100 --rate 50 --count 500
    python bench/publisher_process.py --stack ours --redis-url ... --dreams 100 --duration 10 --concurrency 32
    python bench/publisher_process.py --mode sync --stack ours --redis-url ... --dreams 100 --duration 10

`--mode async` (the default) publishes with the stack's async producer on a uvloop loop,
`--concurrency` publishes in flight when flat out. `--mode sync` is what a Celery worker does:
the stack's sync producer called in a plain loop, one update at a time, no event loop here.

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

from bench.stack_publishers import STACKS, Publisher, SyncPublisher, open_publisher, open_sync_publisher

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


def at_rate_sync(publisher: SyncPublisher, plan: Plan, rate: float, count: int) -> None:
    """`at_rate` for a sync producer: sleeps between calls on the same fixed schedule."""
    started = time.monotonic()
    for i in range(count):
        delay = started + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        dream, sequence = plan.next()
        try:
            publisher.publish(dream, sequence)
        except Exception as exc:
            plan.failed += 1
            print(f"publish failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        else:
            plan.published[dream] += 1


def flat_out_sync(publisher: SyncPublisher, plan: Plan, duration: float) -> None:
    """As many updates as one sync caller manages in `duration` seconds, round the dreams in
    turn: a Celery worker publishing as fast as it can, one call after the other."""
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline:
        dream, sequence = plan.next()
        try:
            publisher.publish(dream, sequence)
        except Exception as exc:
            plan.failed += 1
            print(f"publish failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        else:
            plan.published[dream] += 1


def main_sync(args: argparse.Namespace) -> dict[str, object]:
    publisher = open_sync_publisher(args.stack, args.redis_url)
    plan = Plan(args.dreams, args.first_dream)
    try:
        publisher.publish(WARM_UP_DREAM, None)  # connects, outside the figures
        cpu_before, started = cpu_seconds(), time.time()
        if args.duration is not None:
            flat_out_sync(publisher, plan, args.duration)
        else:
            at_rate_sync(publisher, plan, args.rate, args.count)
        finished = time.time()
        cpu = cpu_seconds() - cpu_before
    finally:
        publisher.close()
    return result(args, plan, started, finished, cpu)


def result(args: argparse.Namespace, plan: Plan, started: float, finished: float, cpu: float) -> dict[str, object]:
    published = sum(plan.published.values())
    return {
        "event": "published",
        "stack": args.stack,
        "mode": args.mode,
        "published": published,
        "published_per_dream": {str(dream): n for dream, n in sorted(plan.published.items())},
        "failed": plan.failed,
        "started": started,
        "finished": finished,
        "publishes_per_second": round(published / max(finished - started, 1e-9), 1),
        "cpu_seconds": round(cpu, 3),
        # The process's CPU (every thread, the producer's own included) per update published.
        "cpu_us_per_publish": round(1e6 * cpu / published, 1) if published else None,
    }


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
        cpu = cpu_seconds() - cpu_before
    finally:
        await publisher.aclose()
    return result(args, plan, started, finished, cpu)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stack", choices=STACKS, required=True)
    parser.add_argument("--mode", choices=("async", "sync"), default="async", help="which producer of the stack")
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--dreams", type=int, default=1)
    parser.add_argument("--first-dream", type=int, default=1)
    parser.add_argument("--rate", type=float, default=10.0, help="updates per second (fixed-rate mode)")
    parser.add_argument("--count", type=int, default=100, help="updates to publish (fixed-rate mode)")
    parser.add_argument("--duration", type=float, help="publish flat out for this many seconds instead")
    parser.add_argument("--concurrency", type=int, default=32, help="publishes in flight (flat-out mode)")
    arguments = parser.parse_args()
    if arguments.mode == "sync":
        report = main_sync(arguments)
    else:
        try:
            import uvloop
        except ImportError:
            report = asyncio.run(main(arguments))
        else:
            report = uvloop.run(main(arguments))
    print(json.dumps(report), flush=True)
