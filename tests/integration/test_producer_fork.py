"""The sync producer keeps working in a process that forked after publishing."""

from __future__ import annotations

import subprocess
import sys

import pytest
import redis

from starlette_dream_ws.groups.backends.redis import keys as redis_keys
from tests.support.processes import clean_env
from tests.support.redis import RedisServer

pytestmark = pytest.mark.integration

# The child exits through normal interpreter shutdown, which cleans up what it inherited.
SCRIPT = """
import os, sys, time
from starlette_dream_ws import send_image_update
send_image_update(1, [], "processing", "before fork")
pid = os.fork()
if pid == 0:
    sys.exit(0)
os.waitpid(pid, 0)
started = time.monotonic()
send_image_update(1, [], "completed", "after fork")
print(time.monotonic() - started)
"""


def test_publishing_after_a_child_exits_is_neither_slow_nor_doubled(redis_server: RedisServer) -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        env=clean_env({"DREAM_WS_BROADCAST_URL": redis_server.url}),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    seconds = float(done.stdout.strip().splitlines()[-1])
    # A child that shared the parent's epoll object would unregister its sockets on exit: the
    # next publish then timed out (5 s) and was retried, so it was published twice.
    assert seconds < 1.0, done.stderr
    with redis.Redis.from_url(redis_server.url) as client:
        history = client.xrange(redis_keys("dream_images_1")[1])
    assert [fields[b"m"].count(b"fork") for _, fields in history] == [1, 1]
    assert b"after fork" in history[-1][1][b"m"]
