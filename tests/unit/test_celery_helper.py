"""The Celery helper (`starlette_dream_ws.celery`), with Celery running tasks in this process.

Tasks run with `apply()` (as `task_always_eager` does), which also runs a retry at once, so a
retry is one more run of the task in the same call. The producer is replaced by a recorder
that builds each message as the real one does (same validation) and can be told to fail.
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from celery import Celery, Task
from celery.exceptions import Ignore, Reject, Retry

from starlette_dream_ws import PublishError, Settings, image_update_message
from starlette_dream_ws import celery as helper
from starlette_dream_ws.celery import RESUME_KWARG, DreamJob, dream_progress, reports_dream

#: Text of a task's own error that must never reach a watcher.
SECRET = "CUDA out of memory on gpu-3 at s3://private-bucket/key=AKIA1234"
URLS = ["https://cdn.example/7/1.png", "https://cdn.example/7/2.png"]


class Publisher:
    """Stands in for `send_image_update`: records each update; `fail_on(n)` fails call n (1-based)."""

    def __init__(self) -> None:
        self.updates: list[dict[str, Any]] = []
        self.settings: list[Settings | None] = []
        self.calls = 0
        self.failing: Callable[[int, dict[str, Any]], bool] = lambda call, update: False

    def __call__(
        self,
        dream_id: int,
        image_urls: list[str] | None = None,
        status: str = "processing",
        message: str | None = None,
        progress: int | None = None,
        *,
        settings: Settings | None = None,
    ) -> None:
        update = image_update_message(dream_id, image_urls, status, message, progress)
        self.calls += 1
        if self.failing(self.calls, update):
            raise PublishError(f"publish to dream_images_{dream_id} failed after 9 attempts: ConnectionError")
        self.updates.append(update)
        self.settings.append(settings)

    def steps(self) -> list[tuple[Any, ...]]:
        """(status, images, message, progress) of every update that got through."""
        return [(u["status"], u["images"], u["message"], u.get("progress")) for u in self.updates]

    def statuses(self) -> list[str]:
        return [update["status"] for update in self.updates]


@pytest.fixture
def published(monkeypatch: pytest.MonkeyPatch) -> Publisher:
    publisher = Publisher()
    monkeypatch.setattr(helper, "send_image_update", publisher)
    return publisher


@pytest.fixture
def app() -> Iterator[Celery]:
    app = Celery("helper-tests", set_as_current=False)
    app.conf.task_always_eager = True
    yield app
    app.close()


# -- the decorator: what watchers see ----------------------------------------------------------


def test_a_task_reports_processing_its_progress_then_completed_with_the_urls_it_returns(
    app: Celery, published: Publisher
) -> None:
    settings = Settings(broadcast_url="memory://")

    @app.task(bind=True)
    @reports_dream(job_arg="job", settings=settings, start_message="Dreaming...")
    def generate(self: Task, dream_id: int, prompt: str, *, job: DreamJob) -> list[str]:
        assert job.dream_id == dream_id and prompt == "a cat"
        job.progress(25, "step 1 of 3")
        job.progress(50, "step 2 of 3", URLS[:1])
        job.progress(75)  # the images of the update before stay
        return URLS

    result = generate.apply(args=(7, "a cat"))
    assert result.get() == URLS
    assert published.steps() == [
        ("processing", [], "Dreaming...", None),
        ("processing", [], "step 1 of 3", 25),
        ("processing", URLS[:1], "step 2 of 3", 50),
        ("processing", URLS[:1], None, 75),
        ("completed", URLS, None, None),
    ]
    assert published.settings == [settings] * 5


def test_a_delete_task_reports_delete_statuses(app: Celery, published: Publisher) -> None:
    @app.task
    @reports_dream(delete=True)
    def delete(dream_id: int) -> None:
        pass

    delete.apply(args=(7,)).get()
    assert published.steps() == [("delete_processing", [], None, None), ("delete_completed", [], None, None)]


@pytest.mark.parametrize(
    ("delete", "failure_message", "expected"),
    [
        (False, None, ("failed", "The dream could not be generated")),
        (True, None, ("delete_failed", "The images could not be deleted")),
        (False, "Something went wrong, we are on it", ("failed", "Something went wrong, we are on it")),
    ],
)
def test_a_failing_task_reports_a_safe_message_and_fails_with_its_own_error(
    app: Celery, published: Publisher, delete: bool, failure_message: str | None, expected: tuple[str, str]
) -> None:
    error = RuntimeError(SECRET)

    @app.task(bind=True)
    @reports_dream(job_arg="job", delete=delete, failure_message=failure_message)
    def work(self: Task, dream_id: int, *, job: DreamJob) -> list[str]:
        job.progress(40, "step 2 of 5", URLS[:1])
        raise error

    result = work.apply(args=(7,))
    assert result.state == "FAILURE" and result.result is error
    status, message = expected
    # The images shown so far stay: the update is the dream's whole state.
    assert published.steps()[-1] == (status, URLS[:1], message, None)
    assert len(published.updates) == 3
    text = json.dumps(published.updates)
    assert "CUDA" not in text and "private-bucket" not in text and "RuntimeError" not in text


def test_a_task_returning_something_else_than_urls_fails_the_dream_and_the_task(
    app: Celery, published: Publisher
) -> None:
    @app.task
    @reports_dream()
    def generate(dream_id: int) -> str:
        return URLS[0]  # one URL, not a list of them

    result = generate.apply(args=(7,))
    assert result.state == "FAILURE" and isinstance(result.result, TypeError)
    assert published.statuses() == ["processing", "failed"]


def test_a_bad_progress_is_an_error_of_the_task(app: Celery, published: Publisher) -> None:
    @app.task
    @reports_dream(job_arg="job")
    def generate(dream_id: int, *, job: DreamJob) -> list[str]:
        job.progress(150)
        return URLS

    result = generate.apply(args=(7,))
    assert result.state == "FAILURE" and isinstance(result.result, ValueError)
    assert published.statuses() == ["processing", "failed"]


def test_an_outcome_sent_by_the_task_itself_is_the_only_one(app: Celery, published: Publisher) -> None:
    @app.task
    @reports_dream(job_arg="job")
    def generate(dream_id: int, *, job: DreamJob) -> str:
        job.fail("The dream machine ran out of ideas")
        return "reported"  # left alone: the outcome is told

    assert generate.apply(args=(7,)).get() == "reported"
    assert published.steps()[-1] == ("failed", [], "The dream machine ran out of ideas", None)
    assert len(published.updates) == 2


def test_a_failed_update_that_cannot_be_published_does_not_mask_the_tasks_error(
    app: Celery, published: Publisher, caplog: pytest.LogCaptureFixture
) -> None:
    published.failing = lambda call, update: update["status"] == "failed"

    @app.task(bind=True, max_retries=3)
    @reports_dream()
    def generate(self: Task, dream_id: int) -> list[str]:
        raise RuntimeError(SECRET)

    with caplog.at_level(logging.ERROR, logger="starlette_dream_ws.celery"):
        result = generate.apply(args=(7,))
    assert result.state == "FAILURE" and isinstance(result.result, RuntimeError)
    assert str(result.result) == SECRET
    assert published.statuses() == ["processing"]  # and no retry: the task failed on its own
    [record] = [record for record in caplog.records if record.name == "starlette_dream_ws.celery"]
    assert record.getMessage() == (
        "dream 7: the failed update could not be published (PublishError); the job's own error follows"
    )


# -- the decorator: retries ------------------------------------------------------------------


def generate_task(app: Celery, runs: list[int], **options: Any) -> Any:
    """A bound task with progress that counts its runs."""

    @app.task(bind=True, **options)
    @reports_dream(job_arg="job")
    def generate(self: Task, dream_id: int, *, job: DreamJob) -> list[str]:
        runs.append(self.request.retries)
        job.progress(50, "1 of 2 images", URLS[:1])
        return URLS

    return generate


def test_a_lost_processing_update_retries_the_task_which_starts_over(app: Celery, published: Publisher) -> None:
    runs: list[int] = []
    published.failing = lambda call, update: call == 1
    result = generate_task(app, runs, max_retries=3).apply(args=(7,))
    assert result.get() == URLS
    assert runs == [1]  # the first run failed before the work began
    assert published.statuses() == ["processing", "processing", "completed"]


def test_a_lost_progress_update_retries_the_task_from_the_start(app: Celery, published: Publisher) -> None:
    runs: list[int] = []
    published.failing = lambda call, update: call == 2
    result = generate_task(app, runs, max_retries=3).apply(args=(7,))
    assert result.get() == URLS
    assert runs == [0, 1]
    # The watchers saw the job start, then start again (a progress update was lost).
    assert published.steps() == [
        ("processing", [], None, None),
        ("processing", [], None, None),
        ("processing", URLS[:1], "1 of 2 images", 50),
        ("completed", URLS, None, None),
    ]


def test_a_lost_completed_update_is_sent_again_without_doing_the_work_again(app: Celery, published: Publisher) -> None:
    runs: list[int] = []
    published.failing = lambda call, update: update["status"] == "completed" and call < 5
    result = generate_task(app, runs, max_retries=3).apply(args=(7,))
    assert result.get() == URLS
    assert runs == [0]
    assert published.statuses() == ["processing", "processing", "completed"]
    assert published.updates[-1]["images"] == URLS


def test_retries_are_bounded_by_max_retries_then_the_task_fails_with_the_publish_error(
    app: Celery, published: Publisher, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs: list[int] = []
    published.failing = lambda call, update: True
    task = generate_task(app, runs, max_retries=2)
    countdowns: list[float | None] = []
    retry = task.retry

    def recording_retry(*args: Any, **kwargs: Any) -> Any:
        countdowns.append(kwargs.get("countdown"))
        return retry(*args, **kwargs)

    monkeypatch.setattr(task, "retry", recording_retry)
    result = task.apply(args=(7,))
    assert result.state == "FAILURE" and isinstance(result.result, PublishError)
    assert runs == []
    assert published.calls == 3  # processing, once per run: no failed update after a lost one
    assert countdowns == [None, None, None]  # None: the task's default_retry_delay


def test_the_retry_countdown_is_configurable(
    app: Celery, published: Publisher, monkeypatch: pytest.MonkeyPatch
) -> None:
    published.failing = lambda call, update: call == 1

    @app.task(bind=True)
    @reports_dream(retry_countdown=12.5)
    def generate(self: Task, dream_id: int) -> list[str]:
        return URLS

    countdowns: list[float | None] = []
    retry = generate.retry

    def recording_retry(*args: Any, **kwargs: Any) -> Any:
        countdowns.append(kwargs.get("countdown"))
        return retry(*args, **kwargs)

    monkeypatch.setattr(generate, "retry", recording_retry)
    assert generate.apply(args=(7,)).get() == URLS
    assert countdowns == [12.5]


def test_an_unbound_task_lets_the_publish_error_go(app: Celery, published: Publisher) -> None:
    published.failing = lambda call, update: call == 1

    @app.task(max_retries=3)
    @reports_dream()
    def generate(dream_id: int) -> list[str]:
        return URLS

    result = generate.apply(args=(7,))
    assert result.state == "FAILURE" and isinstance(result.result, PublishError)
    assert published.calls == 1


def test_a_retry_asked_for_by_the_task_is_no_failure(app: Celery, published: Publisher) -> None:
    runs: list[int] = []

    @app.task(bind=True, max_retries=3)
    @reports_dream()
    def generate(self: Task, dream_id: int) -> list[str]:
        runs.append(self.request.retries)
        if self.request.retries == 0:
            raise self.retry(exc=ConnectionError("the model server is busy"), countdown=0)
        return URLS

    assert generate.apply(args=(7,)).get() == URLS
    assert runs == [0, 1]
    assert published.statuses() == ["processing", "processing", "completed"]


def test_autoretry_is_no_failure_until_the_last_try(app: Celery, published: Publisher) -> None:
    runs: list[int] = []

    @app.task(bind=True, autoretry_for=(ConnectionError,), max_retries=2, retry_backoff=False)
    @reports_dream()
    def generate(self: Task, dream_id: int) -> list[str]:
        runs.append(self.request.retries)
        raise ConnectionError("the model server is busy")

    result = generate.apply(args=(7,))
    assert result.state == "FAILURE" and isinstance(result.result, ConnectionError)
    assert runs == [0, 1, 2]
    assert published.statuses() == ["processing", "processing", "processing", "failed"]


def test_a_task_called_as_a_function_reports_without_celery_around(app: Celery, published: Publisher) -> None:
    @app.task(bind=True, autoretry_for=(ConnectionError,))
    @reports_dream()
    def generate(self: Task, dream_id: int) -> list[str]:
        raise ConnectionError("the model server is busy")

    with pytest.raises(ConnectionError):
        generate(7)  # never retried when called directly: this is the outcome
    assert published.statuses() == ["processing", "failed"]


# -- the decorator: its contract with callers --------------------------------------------------


def test_the_job_parameter_is_hidden_from_callers(app: Celery, published: Publisher) -> None:
    @app.task(bind=True)
    @reports_dream(job_arg="job", dream_arg="dream")
    def generate(self: Task, prompt: str, dream: int = 7, *, job: DreamJob) -> list[str]:
        return URLS

    # Celery checks a call against the task's signature before sending it.
    with pytest.raises(TypeError):
        generate.delay("a cat", job=object())
    with pytest.raises(TypeError):
        generate.delay()
    assert published.updates == []
    assert generate.delay("a cat").get() == URLS  # the dream id by its default
    assert published.updates[0]["dream_id"] == 7


@pytest.mark.parametrize(
    "options",
    [{"dream_arg": "dream"}, {"job_arg": "progress"}, {"job_arg": "dream_id"}],
    ids=["no dream parameter", "job parameter not keyword-only", "dream and job the same"],
)
def test_a_function_that_does_not_fit_is_refused_when_decorated(options: dict[str, Any]) -> None:
    def generate(dream_id: int, progress: DreamJob) -> list[str]:
        return URLS

    with pytest.raises(TypeError, match="reports_dream"):
        reports_dream(**options)(generate)


def test_a_bad_dream_id_is_refused_before_anything_is_sent(app: Celery, published: Publisher) -> None:
    ran: list[bool] = []

    @app.task
    @reports_dream()
    def generate(dream_id: int) -> list[str]:
        ran.append(True)
        return URLS

    result = generate.apply(args=("7",))
    assert result.state == "FAILURE" and isinstance(result.result, TypeError)
    assert published.updates == [] and ran == []


def test_the_outcome_of_work_done_is_sent_from_the_resume_argument(app: Celery, published: Publisher) -> None:
    runs: list[int] = []
    task = generate_task(app, runs)
    assert task.apply(args=(7,), kwargs={RESUME_KWARG: URLS}).get() == URLS
    assert runs == []
    assert published.steps() == [("completed", URLS, None, None)]


# -- the context manager -----------------------------------------------------------------------


def test_a_block_reports_its_start_progress_and_outcome(published: Publisher) -> None:
    settings = Settings(broadcast_url="memory://")
    with dream_progress(7, settings=settings, start_message="Queued", image_urls=URLS[:1]) as job:
        job.progress(40, "step 2 of 5")
        job.complete(URLS, "2 images ready")
    assert job.outcome == "completed" and job.images == URLS
    assert published.steps() == [
        ("processing", URLS[:1], "Queued", None),
        ("processing", URLS[:1], "step 2 of 5", 40),
        ("completed", URLS, "2 images ready", None),
    ]
    assert published.settings == [settings] * 3


def test_a_block_that_raises_reports_failed_and_the_error_goes_on(published: Publisher) -> None:
    error = OSError(SECRET)
    with pytest.raises(OSError) as raised, dream_progress(7, delete=True) as job:
        job.progress(50)
        raise error
    assert raised.value is error
    assert published.steps()[-1] == ("delete_failed", [], "The images could not be deleted", None)


def test_a_block_that_ends_without_an_outcome_is_reported_as_failed(published: Publisher) -> None:
    with pytest.raises(RuntimeError, match="without complete"), dream_progress(7):
        pass
    assert published.statuses() == ["processing", "failed"]


def test_nothing_is_sent_after_the_outcome(published: Publisher) -> None:
    with pytest.raises(ValueError, match="late"), dream_progress(7) as job:
        job.complete(URLS)
        with pytest.raises(RuntimeError, match="already completed"):
            job.progress(90)
        raise ValueError("late")  # after the outcome: no failed update either
    assert published.statuses() == ["processing", "completed"]


@pytest.mark.parametrize(
    "exception",
    [KeyboardInterrupt(), Ignore(), Reject(requeue=True)],
    ids=["interrupted", "replaced", "requeued"],
)
def test_an_interruption_or_a_task_that_goes_on_elsewhere_is_no_failure(
    published: Publisher, exception: BaseException
) -> None:
    with pytest.raises(type(exception)), dream_progress(7):
        raise exception
    assert published.statuses() == ["processing"]


def test_a_task_rejected_for_good_is_a_failure(published: Publisher) -> None:
    with pytest.raises(Reject), dream_progress(7):
        raise Reject(requeue=False)
    assert published.statuses() == ["processing", "failed"]


def test_a_lost_update_is_no_failure_of_the_block(published: Publisher) -> None:
    published.failing = lambda call, update: call == 2
    with pytest.raises(PublishError), dream_progress(7) as job:
        job.progress(10)
    assert job.publish_error is not None
    assert published.statuses() == ["processing"]


def test_a_progress_update_from_another_thread_never_follows_the_outcome(published: Publisher) -> None:
    # The race (a progress update checked before the outcome, sent after it) is a narrow window:
    # many jobs give it many chances to show.
    for dream_id in range(1, 26):
        with dream_progress(dream_id) as job:
            reporting = threading.Event()

            def report(job: DreamJob = job, reporting: threading.Event = reporting) -> None:
                for percent in itertools.cycle(range(100)):
                    try:
                        job.progress(percent)
                    except RuntimeError:
                        return  # the outcome is sent: this job says nothing more
                    reporting.set()

            reporter = threading.Thread(target=report)
            reporter.start()
            assert reporting.wait(timeout=5)
            job.complete(URLS)
            reporter.join(timeout=5)
        assert not reporter.is_alive()
        assert published.statuses()[-1] == "completed", dream_id


def test_a_job_sends_only_inside_its_block(published: Publisher) -> None:
    job = dream_progress(7)
    with pytest.raises(RuntimeError, match="inside its `with` block"):
        job.progress(10)
    with pytest.raises(TypeError):
        dream_progress(7, failure_message="")
    with pytest.raises(ValueError):
        dream_progress(0)
    assert published.updates == []


def test_a_retry_in_a_worker_carries_the_finished_work_and_passes_celerys_checks(published: Publisher) -> None:
    # Not eager: the retry is sent through a broker (in memory), past Celery's check of its arguments.
    app = Celery("worker-like", broker="memory://", set_as_current=False)
    published.failing = lambda call, update: update["status"] == "completed"

    @app.task(bind=True, max_retries=3)
    @reports_dream(job_arg="job")
    def generate(self: Task, dream_id: int, prompt: str, *, job: DreamJob) -> list[str]:
        return URLS

    generate.push_request(id="t1", args=[7], kwargs={"prompt": "a cat"}, retries=0, called_directly=False)
    try:
        with pytest.raises(Retry) as retried:
            generate.run(7, prompt="a cat")
    finally:
        generate.pop_request()
        app.close()
    assert list(retried.value.sig.args) == [7]
    assert retried.value.sig.kwargs == {"prompt": "a cat", RESUME_KWARG: URLS}
    assert published.statuses() == ["processing"]
