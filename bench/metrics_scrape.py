"""The cost of one `/metrics` scrape, through prometheus-client and written by hand.

    python bench/metrics_scrape.py [--connections 10000] [--scrapes 2000]

An app whose counters look like those of a process that has served `--connections`
connections (that many open, as many accepted and closed under several codes, one publish
each). The counters are plain integers, so a scrape's cost does not grow with the number of
connections; this shows it. Prints one JSON object: microseconds per scrape, the best of 7 runs
(the one least disturbed by whatever else the machine runs).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import random
import sys
import timeit
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from starlette_dream_ws import DreamWebSocketApp, allow_any_authenticated_user  # noqa: E402
from starlette_dream_ws.server import probes  # noqa: E402
from starlette_dream_ws.server.metrics import exposition  # noqa: E402

CLOSE_CODES = (1000, 1001, 1008, 1009, 1011, 1013, 4401, 4403, 4408)


def busy_app(connections: int) -> DreamWebSocketApp:
    app = DreamWebSocketApp(authorize=allow_any_authenticated_user, jwt_secret="x" * 32, metrics=True)
    counted = app.context.metrics
    counted.accepted = connections
    counted.messages_in = 30 * connections
    counted.messages_out = 200 * connections
    for _ in range(connections):
        counted.closed[random.choice(CLOSE_CODES)] += 1
    # Open connections are counted with len(): any objects stand in for consumers.
    app.context.consumers.update(object() for _ in range(connections))  # type: ignore[misc]
    published = app.layer.publish_metrics
    for _ in range(connections):
        published.published += 1
        published.seconds.observe(random.expovariate(1 / 0.004))
    return app


def per_scrape_us(scrape: Callable[[], object], scrapes: int) -> float:
    runs = timeit.repeat(scrape, number=scrapes, repeat=7)
    return round(min(runs) / scrapes * 1e6, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--scrapes", type=int, default=2_000)
    args = parser.parse_args()
    app = busy_app(args.connections)
    figures: dict[str, object] = {"connections": args.connections, "python": sys.version.split()[0]}
    try:
        figures["prometheus_client"] = importlib.metadata.version("prometheus-client")
    except importlib.metadata.PackageNotFoundError:
        figures["prometheus_client"] = None
    else:
        app.metrics_text()  # the private registry is made by the first scrape
        figures["prometheus_client_us"] = per_scrape_us(app.metrics_text, args.scrapes)
        figures["prometheus_client_bytes"] = len(app.metrics_text())
    figures["by_hand_us"] = per_scrape_us(lambda: exposition(probes.figures(app)), args.scrapes)
    figures["by_hand_bytes"] = len(exposition(probes.figures(app)))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
