"""Celery tasks that report each dream's progress to the browsers watching it.

    celery -A examples.celery_app worker --loglevel=INFO     # from the repository root

`reports_dream` (from `starlette_dream_ws.celery`, the `celery` extra) tells the watchers each
task's story: `processing` when it starts, a percent `progress` as each image is done,
`completed` with the URLs the task returns, or `failed` with a fixed message when it raises.
Sleeping `step_delay` seconds stands in for the real work. Configuration: `CELERY_BROKER_URL`
(also the result backend unless `CELERY_RESULT_BACKEND` is set) and the `DREAM_WS_*`
variables, `DREAM_WS_BROADCAST_URL` being the Redis the web servers listen on.

Works with every pool, prefork included: each worker process opens its own connection to
the groups backend on its first update and keeps it for its life.
"""

from __future__ import annotations

import os
import time

from celery import Celery, Task
from celery.signals import worker_process_shutdown

from starlette_dream_ws import Settings, close_producers
from starlette_dream_ws.celery import DreamJob, reports_dream

BROKER_URL = os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/1")
RESULT_BACKEND = os.environ.get("CELERY_RESULT_BACKEND", BROKER_URL)
# Built at import, so a bad DREAM_WS_* setting stops the worker at start, not at the first task.
DREAM_WS = Settings.from_env(broadcast_url=os.environ.get("DREAM_WS_BROADCAST_URL", "redis://127.0.0.1:6379/0"))

#: Celery-level retries of an update that could not be published, and the seconds before each.
#: `send_image_update` has already retried for 9 s or more (up to ~54 s against a host that does
#: not answer) when it raises: Redis is really away.
PUBLISH_MAX_RETRIES = 5
PUBLISH_RETRY_COUNTDOWN = 10.0

app = Celery("dreams", broker=BROKER_URL, backend=RESULT_BACKEND)
app.conf.broker_connection_retry_on_startup = True


def image_url(dream_id: int, number: int) -> str:
    return f"https://cdn.example/dreams/{dream_id}/{number}.png"


# Explicit names: the same in the worker (`-A examples.celery_app`) and in `examples/enqueue.py`
# (which imports this file as `celery_app`), whatever the module is called there.
# A lost update retries the task (bind=True): from the start, or, if only `completed` was lost,
# that update alone, without rendering the images again.
@app.task(name="dreams.generate", bind=True, max_retries=PUBLISH_MAX_RETRIES)
@reports_dream(
    job_arg="job",
    settings=DREAM_WS,
    start_message="Dreaming...",
    # What the watchers read when the task raises: never the error's own text.
    failure_message="The dream could not be generated",
    retry_countdown=PUBLISH_RETRY_COUNTDOWN,
)
def generate_dream(
    self: Task, dream_id: int, fail: bool = False, step_delay: float = 1.0, count: int = 2, *, job: DreamJob
) -> list[str]:
    """processing -> progress after each image but the last -> completed with `count` images.

    With `fail=True` the renderer breaks on the last image: the task fails with that error, the
    watchers get `failed` with the message above (and the images done so far).
    """
    urls: list[str] = []
    for number in range(1, count + 1):
        time.sleep(step_delay)  # rendering one image: the real work
        if fail and number == count:
            # A real error carries hosts, paths and ids: fine in the worker's log, not in a browser.
            raise RuntimeError(f"CUDA out of memory on gpu-3 rendering s3://dreams-private/{dream_id}/{number}")
        urls.append(image_url(dream_id, number))
        if number < count:  # the last one is told by `completed`
            job.progress(100 * number // count, f"{number} of {count} images", urls)
    return urls


@app.task(name="dreams.delete", bind=True, max_retries=PUBLISH_MAX_RETRIES)
@reports_dream(
    delete=True,
    job_arg="job",
    settings=DREAM_WS,
    start_message="Deleting images",
    failure_message="The images could not be deleted",
    retry_countdown=PUBLISH_RETRY_COUNTDOWN,
)
def delete_dream(
    self: Task, dream_id: int, fail: bool = False, step_delay: float = 1.0, count: int = 2, *, job: DreamJob
) -> None:
    """delete_processing -> progress after each image but the last -> delete_completed; with
    `fail=True`, -> delete_failed (the storage refuses the last deletion)."""
    for number in range(1, count + 1):
        time.sleep(step_delay)  # deleting one image
        if fail and number == count:
            raise PermissionError(f"DeleteObject denied on s3://dreams-private/{dream_id}/{number}")
        if number < count:
            job.progress(100 * number // count, f"{number} of {count} images deleted")
    # Returns no URLs: `delete_completed` with no images left.


@worker_process_shutdown.connect
def _close_dream_ws(**_: object) -> None:
    # Prefork children leave with os._exit(), which skips atexit: close the connection here.
    close_producers()
