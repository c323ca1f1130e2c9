"""The sync producer on Redis (and PostgreSQL) publishes from the calling thread, on a connection of its own.

What a Celery worker does: `send_image_update` / `publish` from plain threads, no app and no
event loop in the process. Checked against a real Redis: positions stay gap-free per group
across threads, each thread keeps one connection, a Redis restarted empty (its scripts gone)
is used again at once, and a Redis that stays away gives `PublishError` after the retries.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator

import pytest
import redis

from starlette_dream_ws import PublishError, Settings, close_producers, publish, send_image_update
from starlette_dream_ws.groups.backends.postgres import PostgresBackend
from starlette_dream_ws.groups.backends.redis import keys
from tests.support.postgres import PostgresServer
from tests.support.redis import RedisServer

pytestmark = pytest.mark.integration

THREADS = 4
PER_THREAD = 50


@pytest.fixture
def settings(redis_server: RedisServer) -> Iterator[Settings]:
    yield Settings(broadcast_url=redis_server.url, publish_retries=2, publish_backoff=0.01, publish_timeout=1.0)
    close_producers()


def history(server: RedisServer, group: str) -> list[tuple[int, dict[str, object]]]:
    client = redis.Redis.from_url(server.url)
    try:
        return [
            (int(entry_id.decode().partition("-")[0]), json.loads(fields[b"m"]))
            for entry_id, fields in client.xrange(keys(group)[1])
        ]
    finally:
        client.close()


def producer_connections(server: RedisServer) -> int:
    client = redis.Redis.from_url(server.url)
    try:
        return len(client.client_list()) - 1  # not this one
    finally:
        client.close()


def test_threads_publish_gap_free_positions_on_a_connection_each(redis_server: RedisServer, settings: Settings) -> None:
    failures: list[BaseException] = []
    barrier = threading.Barrier(THREADS)

    def worker(index: int) -> None:
        try:
            barrier.wait()
            for n in range(PER_THREAD):
                # Every thread writes to both groups, interleaved: positions must not collide.
                send_image_update(1, status="processing", message=f"{index}:{n}", progress=n, settings=settings)
                publish("renders_7", {"type": "render_update", "by": index, "n": n}, settings=settings)
        except BaseException as exc:  # reported to the test, which fails on it
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    for group in ("dream_images_1", "renders_7"):
        seqs = [seq for seq, _ in history(redis_server, group)]
        # The stream is capped approximately (at least `history_size` kept): the newest, gap-free.
        assert len(seqs) >= settings.history_size
        assert seqs == list(range(THREADS * PER_THREAD - len(seqs) + 1, THREADS * PER_THREAD + 1))
    # Each thread's own updates keep their order.
    updates = [message for _, message in history(redis_server, "renders_7")]
    for index in range(THREADS):
        mine = [update["n"] for update in updates if update["by"] == index]
        assert mine == sorted(mine)
    assert producer_connections(redis_server) == THREADS


def test_a_redis_restarted_empty_is_used_again_at_once(redis_server: RedisServer, settings: Settings) -> None:
    send_image_update(2, status="processing", settings=settings)
    redis_server.stop()
    redis_server.start()
    # Its scripts and keys are gone: the next publish loads the script and starts a new history.
    send_image_update(2, status="completed", settings=settings)
    entries = history(redis_server, "dream_images_2")
    assert [(seq, message["status"]) for seq, message in entries] == [(1, "completed")]


def test_a_redis_that_stays_away_gives_publish_error(redis_server: RedisServer, settings: Settings) -> None:
    send_image_update(3, status="processing", settings=settings)
    redis_server.stop()
    try:
        with pytest.raises(PublishError, match="3 attempts"):
            send_image_update(3, status="completed", settings=settings)
    finally:
        redis_server.start()


def test_postgres_threads_publish_gap_free_positions_on_a_connection_each(postgres_server: PostgresServer) -> None:
    settings = Settings(broadcast_url=postgres_server.url, publish_retries=2, publish_backoff=0.01)
    # The servers' backend makes the tables; a producer only writes to them.
    asyncio.run(_make_tables(postgres_server.url))
    failures: list[BaseException] = []

    def worker(index: int) -> None:
        try:
            for n in range(PER_THREAD):
                publish("renders_pg", {"type": "render_update", "by": index, "n": n}, settings=settings)
        except BaseException as exc:  # reported to the test, which fails on it
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert failures == []
        rows = postgres_server.sql("SELECT seq, message FROM dream_ws_messages WHERE grp = 'renders_pg' ORDER BY seq")
        seqs = [int(line.split("|")[0]) for line in rows.splitlines() if line.strip()]
        assert seqs == list(range(THREADS * PER_THREAD - len(seqs) + 1, THREADS * PER_THREAD + 1))
        assert len(seqs) == settings.history_size
        sessions = postgres_server.sql(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        assert int(sessions.strip()) == THREADS
    finally:
        close_producers()


async def _make_tables(url: str) -> None:
    backend = PostgresBackend(url)
    await backend.connect()
    await backend.disconnect()
