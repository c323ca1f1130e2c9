"""The Celery example end to end: a real prefork worker publishes, two uvicorn servers deliver.

The worker (`examples/celery_app.py`, whose tasks use `starlette_dream_ws.celery.reports_dream`)
runs with `--pool=prefork --concurrency=2`, so every update is published from a forked child,
through the sync `send_image_update`. Browser-like clients (token in the subprotocol) on both
servers (`examples/server.py`) watch several dreams while the test process enqueues the tasks
with `apply_async`, as a web app would: processing, percent progress, then completed with the
task's URLs, or failed with a fixed message while the task fails with its own error.

The retries (a `PublishError` retries the task, a bounded number of times) are tested in this
process with `apply()`, which runs retries at once.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import redis
from websockets.asyncio.client import ClientConnection

from starlette_dream_ws import PublishError
from starlette_dream_ws import celery as dream_ws_celery
from tests.support.processes import POLL_INTERVAL, START_TIMEOUT, clean_env, stop_process
from tests.support.processes import spawn as spawn_process
from tests.support.redis import RedisServer
from tests.support.tokens import TokenFactory
from tests.support.uvicorn import UvicornServer, server_env, serving

from .client import SUBPROTOCOL, connect_dream, established, recv_json, send_json

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
#: Seconds of simulated work per step: enough for both pool processes to be busy at once.
STEP_DELAY = 0.05
#: Seconds one task may take from enqueue to result.
TASK_TIMEOUT = 15.0
#: Seconds the worker may take to stop: Celery's warm shutdown alone takes a few.
WORKER_STOP_TIMEOUT = 15.0


# -- the worker ---------------------------------------------------------------------------


class CeleryWorker:
    """`python -m celery -A examples.celery_app worker` (prefork) with its own env and log."""

    def __init__(self, env: Mapping[str, str], log_path: Path, concurrency: int = 2) -> None:
        self.env = clean_env(env)
        self.log_path = log_path
        self.args = [sys.executable, "-m", "celery", "-A", "examples.celery_app", "worker"]
        self.args += ["--pool=prefork", f"--concurrency={concurrency}", "--loglevel=INFO"]
        # A unique node name; no mingle/gossip/heartbeat: nothing to wait for from other nodes.
        self.args += ["--hostname", f"test-{uuid.uuid4().hex[:8]}@%h", "--without-mingle", "--without-gossip"]
        self.args += ["--without-heartbeat"]
        self.process: subprocess.Popen[bytes] | None = None
        #: Ids of tasks meant to fail: Celery logs their error (and traceback) as it should.
        self.expected_failures: set[str] = set()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def spawn(self) -> None:
        # The repository root as cwd: `-m` puts it on sys.path, so `examples.celery_app` imports.
        self.process = spawn_process(self.args, env=self.env, log=self.log_path, cwd=ROOT)

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        assert self.process is not None, "spawn() first"
        deadline = time.monotonic() + timeout
        while not re.search(r"^\[.*MainProcess\] \S+ ready\.$", self.log_text(), re.MULTILINE):
            if self.process.poll() is not None:
                raise RuntimeError(f"the worker exited with {self.process.returncode}:\n{self.log_text()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the worker was not ready within {timeout}s:\n{self.log_text()}")
            time.sleep(POLL_INTERVAL)

    def pool_pids(self) -> list[int]:
        """The pool processes: the worker's children."""
        return [pid for pid, (_, ppid, _) in _processes().items() if ppid == self.pid]

    def stop(self) -> None:
        """SIGTERM (warm shutdown), SIGKILL after a bounded wait; then no process of its group is left."""
        if self.process is None:
            return
        stop_process(self.process, timeout=WORKER_STOP_TIMEOUT)
        # Its own session, so its own process group: pool processes orphaned by a kill end here.
        deadline = time.monotonic() + 5.0
        while _group_alive(self.pid):
            if time.monotonic() > deadline:
                os.killpg(self.pid, signal.SIGKILL)
                deadline = time.monotonic() + 5.0
            time.sleep(POLL_INTERVAL)

    def shutdown_problems(self) -> list[str]:
        problems = []
        assert self.process is not None
        if self.process.returncode != 0:
            problems.append(f"exit status {self.process.returncode}")
        log = self.log_text()
        if "Warm shutdown" not in log:
            problems.append("no warm shutdown")
        bad = re.compile(r"Traceback|Exception ignored|destroyed but it is pending|(ERROR|CRITICAL|WARNING)/")
        expected = re.compile(r"ERROR/ForkPoolWorker-\d+\] Task dreams\.\w+\[([0-9a-f-]+)\] raised unexpected: ")
        after_expected = False
        for line in log.splitlines():
            failure = expected.search(line)
            if failure is not None and failure[1] in self.expected_failures:
                after_expected = True
                continue
            # The traceback of an expected failure follows its line.
            if not (after_expected and line == "Traceback (most recent call last):") and bad.search(line):
                problems.append(f"log: {line}")
            after_expected = False
        return problems


def _processes() -> dict[int, tuple[str, int, int]]:
    """pid -> (state, parent pid, process group) of every process, from /proc (Linux)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
            state, ppid, pgrp = stat.rsplit(")", 1)[1].split()[:3]
            found[int(entry.name)] = (state, int(ppid), int(pgrp))
    return found


def _group_alive(pgid: int) -> bool:
    """Whether a live process (not a zombie) is left in the process group."""
    return any(pgrp == pgid and state != "Z" for state, _, pgrp in _processes().values())


def redis_connections_by_pid(pids: Sequence[int], redis_port: int, admin: redis.Redis, db: int) -> dict[int, set[int]]:
    """For each process, the ids of its connections to Redis that have `db` selected.

    Redis names a client by its address; /proc maps that local port to a socket, and the
    socket to the process holding it.
    """
    local_port_of_inode = {}
    for table in (Path("/proc/net/tcp"), Path("/proc/net/tcp6")):
        for line in table.read_text().splitlines()[1:] if table.exists() else []:
            fields = line.split()
            local, remote, inode = fields[1], fields[2], fields[9]
            if int(remote.rsplit(":", 1)[1], 16) == redis_port:
                local_port_of_inode[inode] = int(local.rsplit(":", 1)[1], 16)
    client_of_port = {
        int(client["addr"].rsplit(":", 1)[1]): int(client["id"])
        for client in admin.client_list()
        if int(client["db"]) == db
    }
    found: dict[int, set[int]] = {}
    for pid in pids:
        ids = found.setdefault(pid, set())
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            port = local_port_of_inode.get(target.removeprefix("socket:[").removesuffix("]"))
            if port in client_of_port:
                ids.add(client_of_port[port])
    return found


# -- the example's tasks, in this process ---------------------------------------------------


def load_example(monkeypatch: pytest.MonkeyPatch, env: Mapping[str, str]) -> ModuleType:
    """A fresh import of `examples/celery_app.py` configured by `env` (its own Celery app).

    The tasks have explicit names, so the module's name here does not matter to the worker.
    """
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    spec = importlib.util.spec_from_file_location(f"celery_app_{uuid.uuid4().hex}", EXAMPLES / "celery_app.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def urls(dream_id: int, count: int) -> list[str]:
    return [f"https://cdn.example/dreams/{dream_id}/{n}.png" for n in range(1, count + 1)]


#: An update as a test expects it: status, images, message, progress (None: no such field).
Update = tuple[str, list[str], str | None, int | None]


def generated(dream_id: int, fail: bool = False, count: int = 2) -> list[Update]:
    """The updates of `generate_dream`: progress after each image but the last, then the outcome."""
    steps: list[Update] = [("processing", [], "Dreaming...", None)]
    steps += [("processing", urls(dream_id, n), f"{n} of {count} images", 100 * n // count) for n in range(1, count)]
    if fail:  # the last image fails; the ones done stay
        return [*steps, ("failed", urls(dream_id, count - 1), "The dream could not be generated", None)]
    return [*steps, ("completed", urls(dream_id, count), None, None)]


def deleted(dream_id: int, fail: bool = False, count: int = 2) -> list[Update]:
    """The updates of `delete_dream`."""
    steps: list[Update] = [("delete_processing", [], "Deleting images", None)]
    steps += [("delete_processing", [], f"{n} of {count} images deleted", 100 * n // count) for n in range(1, count)]
    if fail:
        return [*steps, ("delete_failed", [], "The images could not be deleted", None)]
    return [*steps, ("delete_completed", [], None, None)]


#: What the tasks' own errors say: it must never reach a watcher.
LEAKS = ("CUDA", "gpu-3", "s3://", "dreams-private", "DeleteObject", "RuntimeError", "PermissionError", "Traceback")


# -- fixtures -----------------------------------------------------------------------------


@pytest.fixture
def redis_urls(redis_server: RedisServer) -> dict[str, str]:
    """The dream-ws groups, the Celery broker and its results: one Redis, three databases."""
    base = f"redis://127.0.0.1:{redis_server.port}"
    return {
        "DREAM_WS_BROADCAST_URL": f"{base}/0",
        "CELERY_BROKER_URL": f"{base}/1",
        "CELERY_RESULT_BACKEND": f"{base}/2",
    }


@pytest.fixture
def stack(
    redis_urls: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[CeleryWorker, UvicornServer, UvicornServer]]:
    """The worker and servers A and B, started side by side; each must shut down cleanly."""
    worker = CeleryWorker(redis_urls, tmp_path_factory.mktemp("celery") / "worker.log")
    env = server_env(redis_urls["DREAM_WS_BROADCAST_URL"])
    pair = [
        UvicornServer(env, "server:app", app_dir=EXAMPLES, workdir=tmp_path_factory.mktemp(name))
        for name in ("server-a", "server-b")
    ]
    worker.spawn()
    try:
        with serving(*pair):
            worker.wait_ready()
            yield worker, pair[0], pair[1]
    finally:
        worker.stop()
    problems = worker.shutdown_problems()
    assert not problems, "\n".join(problems) + "\n" + worker.log_text()[-4000:]


@pytest.fixture
def example(monkeypatch: pytest.MonkeyPatch, redis_urls: dict[str, str]) -> Iterator[ModuleType]:
    module = load_example(monkeypatch, redis_urls)
    yield module
    module.app.close()


# -- tests ----------------------------------------------------------------------------------


def run_tasks(worker: CeleryWorker, calls: Sequence[tuple[Any, int, dict[str, Any], bool]]) -> list[Any]:
    """Enqueue every call at once, then wait for every result (in one thread: the Redis result
    backend subscribes to a result in the thread that sends the task). A task meant to fail
    gives its error, as the result backend brought it back."""
    results = []
    for task, dream_id, kwargs, fails in calls:
        result = task.apply_async(args=(dream_id,), kwargs=kwargs)
        if fails:
            worker.expected_failures.add(result.id)
        results.append(result)
    outcomes = []
    for result in results:
        outcome = result.get(timeout=TASK_TIMEOUT, propagate=False)
        assert result.state == ("FAILURE" if result.id in worker.expected_failures else "SUCCESS"), outcome
        outcomes.append(outcome)
    return outcomes


async def receive(ws: ClientConnection, count: int) -> list[dict[str, Any]]:
    return [await recv_json(ws) for _ in range(count)]


@pytest.mark.anyio
async def test_a_prefork_worker_walks_every_dream_to_its_watchers_on_both_servers(
    stack: tuple[CeleryWorker, UvicornServer, UvicornServer],
    example: ModuleType,
    redis_server: RedisServer,
    make_token: TokenFactory,
) -> None:
    worker, server_a, server_b = stack
    # Dreams 11 and 12 are generated then deleted (12's deletion fails), 13 fails, 14 is generated
    # in four images; 15 is watched and never touched. Each batch runs at once on both pool processes.
    batches = [
        (
            example.generate_dream,
            {
                11: generated(11),
                12: generated(12),
                13: generated(13, fail=True),
                14: generated(14, count=4),
            },
        ),
        (example.delete_dream, {11: deleted(11), 12: deleted(12, fail=True)}),
    ]
    watched = [11, 12, 13, 14, 15]

    with redis.Redis(port=redis_server.port, db=15) as admin:

        def producer_connections() -> dict[int, set[int]]:
            return redis_connections_by_pid([worker.pid, *worker.pool_pids()], redis_server.port, admin, db=0)

        async with AsyncExitStack() as exit_stack:
            # Two browser-like watchers per dream, one on each server.
            watchers: dict[int, list[ClientConnection]] = {}
            for dream_id in watched:
                for server in (server_a, server_b):
                    ws = await exit_stack.enter_async_context(
                        connect_dream(server, dream_id, make_token(f"user-{dream_id}"), "subprotocol")
                    )
                    assert ws.subprotocol == SUBPROTOCOL
                    await established(ws, dream_id)
                    watchers.setdefault(dream_id, []).append(ws)
            # No update yet, so no producer connection: children connect on their first update.
            assert not any(producer_connections().values())

            final: dict[int, dict[str, Any]] = {}
            connections: list[dict[int, set[int]]] = []
            for task, batch in batches:
                # The walks expected to end in failed / delete_failed are asked to fail.
                calls = []
                for dream_id, expected in batch.items():
                    fails = expected[-1][0].endswith("failed")
                    # One update per image, and the first: count + 1 of them.
                    kwargs = {"step_delay": STEP_DELAY, "fail": fails, "count": len(expected) - 1}
                    calls.append((task, dream_id, kwargs, fails))
                since = time.time()
                outcomes, *received = await asyncio.gather(
                    asyncio.to_thread(run_tasks, worker, calls),
                    *(receive(ws, len(batch[dream_id])) for dream_id in batch for ws in watchers[dream_id]),
                )
                until = time.time()
                for outcome, expected in zip(outcomes, batch.values(), strict=True):
                    status, images = expected[-1][:2]
                    if status in ("failed", "delete_failed"):
                        # The task failed with its own error, text and all: only the watchers never saw it.
                        assert isinstance(outcome, RuntimeError | PermissionError), outcome
                        assert "dreams-private" in str(outcome), outcome
                    else:
                        # The URLs the task returned are those of `completed` (none for a deletion).
                        assert outcome == (images if status == "completed" else None), outcome
                by_watcher = iter(received)
                for dream_id, expected in batch.items():
                    on_a, on_b = next(by_watcher), next(by_watcher)
                    check_updates(on_a, dream_id, expected, since, until)
                    # The very same messages on both servers: one publish, fanned out by each.
                    assert on_a == on_b
                    final[dream_id] = on_a[-1]
                connections.append(producer_connections())

            # Nothing else reached any watcher: the next message each one gets is the answer to
            # request_status, its dream's final state.
            for dream_id in watched:
                for ws in watchers[dream_id]:
                    await send_json(ws, {"type": "request_status"})
                    assert_final_state(await recv_json(ws), final.get(dream_id))

    # Every update came from a pool process, each with one backend connection (a few sockets:
    # pub/sub, commands) opened on its first update and kept: the second batch opened none.
    first, second = connections
    assert first[worker.pid] == set() == second[worker.pid], connections
    used = {pid: ids for pid, ids in first.items() if ids}
    assert len(used) == 2, f"both pool processes should have published: {connections}"
    assert len({len(ids) for ids in used.values()}) == 1 and all(len(ids) <= 3 for ids in used.values()), used
    assert {pid: second[pid] for pid in used} == used, connections

    # A client joining late, on either server, catches up with request_status.
    for dream_id in watched:
        for server in (server_a, server_b):
            async with connect_dream(server, dream_id, make_token("late"), "subprotocol") as ws:
                await established(ws, dream_id)
                await send_json(ws, {"type": "request_status"})
                assert_final_state(await recv_json(ws), final.get(dream_id))


def check_updates(
    received: list[dict[str, Any]], dream_id: int, expected: list[Update], since: float, until: float
) -> None:
    """Every stage of the dream, in order, with every field right; nothing of another dream."""
    assert [(m["status"], m["images"], m["message"], m.get("progress")) for m in received] == expected, (
        dream_id,
        received,
    )
    for message, (*_, progress) in zip(received, expected, strict=True):
        fields = {"type", "dream_id", "status", "images", "timestamp", "message", "seq", "epoch"}
        assert set(message) == (fields if progress is None else fields | {"progress"}), message
        assert message["type"] == "image_update" and message["dream_id"] == dream_id, message
        # Stamped by the worker when it published.
        assert since <= message["timestamp"] <= until, (message, since, until)
        text = json.dumps(message)
        assert not any(leak in text for leak in LEAKS), message
    stamps = [message["timestamp"] for message in received]
    assert stamps == sorted(stamps), received


def assert_final_state(answer: dict[str, Any], final: dict[str, Any] | None) -> None:
    if final is None:
        assert answer["type"] == "error" and answer["code"] == "status_unknown", answer
    else:
        assert answer == final


# -- retries, in this process (Celery runs retries at once under apply()) ---------------------


class Recorder:
    """Stands in for the helper's `send_image_update`: records each call's status, then fails
    the calls `fails` picks (by their 1-based number) with `PublishError`."""

    def __init__(self, fails: Callable[[int], bool]) -> None:
        self.statuses: list[str] = []
        self.fails = fails

    def __call__(self, dream_id: int, image_urls: list[str], status: str, **_: object) -> None:
        self.statuses.append(status)
        if self.fails(len(self.statuses)):
            raise PublishError("Redis is away")


def test_a_lost_progress_update_retries_the_task_from_the_start(
    example: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    published = Recorder(fails=lambda call: call == 2)
    monkeypatch.setattr(dream_ws_celery, "send_image_update", published)
    result = example.generate_dream.apply(args=(7,), kwargs={"step_delay": 0, "count": 3})
    assert result.get() == urls(7, 3)
    # The retried run starts over, from processing: its images are rendered again.
    assert published.statuses == ["processing", "processing", "processing", "processing", "processing", "completed"]


def test_a_lost_completed_update_is_published_again_without_rendering_again(
    example: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    published = Recorder(fails=lambda call: call in (3, 4))
    monkeypatch.setattr(dream_ws_celery, "send_image_update", published)
    result = example.generate_dream.apply(args=(7,), kwargs={"step_delay": 0})
    assert result.get() == urls(7, 2)
    # processing, 50%, then completed three times (twice lost): the images were rendered once.
    assert published.statuses == ["processing", "processing", "completed", "completed", "completed"]


def test_an_update_that_never_gets_through_fails_the_task_after_bounded_retries(
    example: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    published = Recorder(fails=lambda call: True)
    monkeypatch.setattr(dream_ws_celery, "send_image_update", published)
    result = example.delete_dream.apply(args=(7,), kwargs={"step_delay": 0})
    assert result.state == "FAILURE" and isinstance(result.result, PublishError), result.result
    assert published.statuses == ["delete_processing"] * (example.PUBLISH_MAX_RETRIES + 1)


def test_a_backend_that_is_away_fails_the_task_after_bounded_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same with the real producer, against a port nothing listens on: connections refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {
        "DREAM_WS_BROADCAST_URL": f"redis://127.0.0.1:{port}/0",
        "DREAM_WS_PUBLISH_RETRIES": "1",
        "DREAM_WS_PUBLISH_BACKOFF": "0.01",
        # No broker is reached: apply() runs the task and its retries here.
        "CELERY_BROKER_URL": "memory://",
        "CELERY_RESULT_BACKEND": "cache+memory://",
    }
    example = load_example(monkeypatch, env)
    try:
        attempts: list[str] = []
        send = dream_ws_celery.send_image_update

        def counting(dream_id: int, **kwargs: Any) -> None:
            attempts.append(kwargs["status"])
            send(dream_id, **kwargs)

        monkeypatch.setattr(dream_ws_celery, "send_image_update", counting)
        result = example.generate_dream.apply(args=(7,), kwargs={"step_delay": 0})
        assert result.state == "FAILURE" and isinstance(result.result, PublishError), result.result
        assert "after 2 attempts" in str(result.result)
        assert attempts == ["processing"] * (example.PUBLISH_MAX_RETRIES + 1)
    finally:
        example.app.close()
