"""Celery tasks that report each dream's progress to the browsers watching it.

    celery -A examples.celery_app worker --loglevel=INFO     # from the repository root

Each task walks one dream through its statuses and calls the sync `send_image_update` at
every stage; sleeping `step_delay` seconds stands in for the real work. Configuration:
`CELERY_BROKER_URL` (also the result backend unless `CELERY_RESULT_BACKEND` is set) and the
`DREAM_WS_*` variables, `DREAM_WS_BROADCAST_URL` being the Redis the web servers listen on.

Works with every pool, prefork included: each worker process opens its own connection to
the groups backend on its first update and keeps it for its life.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

from celery import Celery, Task
from celery.signals import worker_process_shutdown

from starlette_dream_ws import PublishError, Settings, close_producers, send_image_update

BROKER_URL = os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/1")
RESULT_BACKEND = os.environ.get("CELERY_RESULT_BACKEND", BROKER_URL)
# Built at import, so a bad DREAM_WS_* setting stops the worker at start, not at the first task.
DREAM_WS = Settings.from_env(broadcast_url=os.environ.get("DREAM_WS_BROADCAST_URL", "redis://127.0.0.1:6379/0"))

#: Celery-level retries of an update that could not be published, and the seconds before each.
#: `send_image_update` has already retried for ~9 s when it raises: Redis is really away.
PUBLISH_MAX_RETRIES = 5
PUBLISH_RETRY_COUNTDOWN = 10.0

app = Celery("dreams", broker=BROKER_URL, backend=RESULT_BACKEND)
app.conf.broker_connection_retry_on_startup = True

#: One update: status, image URLs, message.
Step = tuple[str, list[str], str]


def images(dream_id: int, count: int) -> list[str]:
    return [f"https://cdn.example/dreams/{dream_id}/{n}.png" for n in range(1, count + 1)]


def walk(task: Task, dream_id: int, steps: Sequence[Step], step_delay: float, resume_at: int) -> str:
    """Publish `steps` from `resume_at` on, doing `step_delay` seconds of "work" before each next one."""
    for index in range(resume_at, len(steps)):
        if index > resume_at:
            time.sleep(step_delay)  # the real work between two updates
        status, urls, message = steps[index]
        try:
            send_image_update(dream_id, urls, status, message, settings=DREAM_WS)
        except PublishError as exc:
            # Never swallowed: Celery runs the task again later, from this step (the work before
            # it is done). Past max_retries the task fails with this error, in the result and the log.
            # kwargs in full: on retry, explicit kwargs replace the request's, they are not merged.
            raise task.retry(
                exc=exc, countdown=PUBLISH_RETRY_COUNTDOWN, kwargs={**task.request.kwargs, "resume_at": index}
            ) from exc
    return steps[-1][0]


# Explicit names: the same in the worker (`-A examples.celery_app`) and in `examples/enqueue.py`
# (which imports this file as `celery_app`), whatever the module is called there.
@app.task(name="dreams.generate", bind=True, max_retries=PUBLISH_MAX_RETRIES)
def generate_dream(self: Task, dream_id: int, fail: bool = False, step_delay: float = 1.0, resume_at: int = 0) -> str:
    """processing -> completed, or -> failed with `fail=True`; returns the final status."""
    final: Step = (
        ("failed", images(dream_id, 1), "The dream machine ran out of ideas")
        if fail
        else ("completed", images(dream_id, 2), "2 images ready")
    )
    steps: list[Step] = [("processing", [], "Dreaming..."), ("processing", images(dream_id, 1), "1 of 2 images"), final]
    # A failed dream is news to report, not a failed task: the task succeeds in telling it.
    return walk(self, dream_id, steps, step_delay, resume_at)


@app.task(name="dreams.delete", bind=True, max_retries=PUBLISH_MAX_RETRIES)
def delete_dream(self: Task, dream_id: int, fail: bool = False, step_delay: float = 1.0, resume_at: int = 0) -> str:
    """delete_processing -> delete_completed, or -> delete_failed with `fail=True`."""
    final: Step = (
        ("delete_failed", images(dream_id, 2), "The images could not be deleted")
        if fail
        else ("delete_completed", [], "Images deleted")
    )
    steps: list[Step] = [("delete_processing", images(dream_id, 2), "Deleting 2 images"), final]
    return walk(self, dream_id, steps, step_delay, resume_at)


@worker_process_shutdown.connect
def _close_dream_ws(**_: object) -> None:
    # Prefork children leave with os._exit(), which skips atexit: close the connection here.
    close_producers()
