"""This package's dream endpoint as the benchmark serves it: `uvicorn bench.servers.ours:app`.

Defaults everywhere except what a benchmark must lift: one user holds every connection, and
the per-process connection cap leaves room for the idle scenario.
"""

import os

from starlette_dream_ws import DreamWebSocketApp, allow_any_authenticated_user

app = DreamWebSocketApp(
    authorize=allow_any_authenticated_user,
    broadcast_url=os.environ["BENCH_REDIS_URL"],
    jwt_secret=os.environ["BENCH_JWT_SECRET"],
    max_connections=50_000,
    max_connections_per_user=1_000_000,
)
