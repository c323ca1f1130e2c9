"""A dream's life told from Celery tasks: `processing`, percent progress, then `completed` or
`failed` (the `celery` extra: `pip install 'starlette-dream-ws[celery]'`).

A whole task, with the decorator (under `@app.task`)::

    @app.task(bind=True, max_retries=5, default_retry_delay=10)
    @reports_dream(job_arg="job", failure_message="The dream could not be generated")
    def generate(self, dream_id: int, prompt: str, *, job: DreamJob) -> list[str]:
        for step in range(1, 5):
            render(prompt, step)
            job.progress(25 * step, f"step {step} of 4")
        return upload_images()  # `completed`, with these URLs

Any block of code, with the context manager the decorator is built on::

    with dream_progress(dream_id, settings=settings) as job:
        job.progress(40, "step 2 of 5")
        job.complete(urls)

What the watchers see:

* `processing` when the job starts (`delete_processing` with `delete=True`), then one
  `processing` update per `job.progress(percent, message)` (`progress` 0-100);
* `completed` with the image URLs the task returns, or that `job.complete()` is given;
* `failed` when the code raises, with `failure_message`: a fixed text, never the exception's,
  which can hold paths, hosts or secrets; the exception itself is raised again, for Celery to
  record and log. `job.fail(message)` reports a failure without raising.

Nothing is sent after the outcome. An exception after which Celery runs the task again
(`self.retry()`, `autoretry_for` with retries left, `self.replace()`) is no failure: nothing is
sent, the next run goes on. Neither is an interruption that is not an `Exception` (a worker
shutting down).

Retries: every update is a `send_image_update`, which retries for a while and then raises
`PublishError`. In a bound task (`bind=True`) that error becomes `self.retry(exc=...)` (after
`retry_countdown` seconds, else the task's `default_retry_delay`), within the task's
`max_retries`; otherwise, or once they are spent, the task fails with it and the watchers keep
the last update they got.

* An error on `processing` or on a progress update: the retried run starts over, from the
  `processing` update (its watchers see the job start again), so the work must be safe to do
  twice. Catch `PublishError` around `job.progress()` if a lost progress update should not
  cost a retry: the next update carries the whole state anyway.
* An error on `completed`: the work is done, so the retried run only publishes `completed`,
  with the same URLs, without calling the function (they travel in the retry's keyword
  argument `_dream_ws_images`).
* An error on `failed`: logged, and the task's own exception is raised, never masked.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import threading
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, Protocol, TypeVar, cast

from .groups.publishing import PublishError
from .producers import send_image_update
from .protocol import ImageStatus, image_update_message
from .settings import Settings

__all__ = ["RESUME_KWARG", "DreamJob", "dream_progress", "reports_dream"]

logger = logging.getLogger("starlette_dream_ws.celery")

R = TypeVar("R")

#: The keyword argument in which a retried task gets the image URLs of work already done.
RESUME_KWARG = "_dream_ws_images"

#: What the watchers read when the code raises, unless the integrator says otherwise.
DEFAULT_FAILURE_MESSAGES = {False: "The dream could not be generated", True: "The images could not be deleted"}


# -- the little of Celery used here ----------------------------------------------------------
# Celery ships no type information: the names used here are imported once, and typed, here.


class _Request(Protocol):
    retries: int
    called_directly: bool
    kwargs: dict[str, Any] | None


class _Task(Protocol):
    request: _Request
    max_retries: int | None

    def retry(
        self, *, exc: BaseException, countdown: float | None = None, kwargs: dict[str, Any] | None = None
    ) -> BaseException: ...


try:
    _exceptions = importlib.import_module("celery.exceptions")
    _TASK_CLASS = cast("type[object]", importlib.import_module("celery.app.task").Task)
    _current_task = cast("Callable[[], _Task | None]", importlib.import_module("celery._state").get_current_task)
except ImportError as exc:  # the extra this module is for is not installed
    raise ImportError("starlette_dream_ws.celery needs Celery: pip install 'starlette-dream-ws[celery]'") from exc

#: Raised by a task that goes on elsewhere: `self.retry()`, and `self.replace()` (Ignore).
_GOES_ON = cast("tuple[type[BaseException], ...]", (_exceptions.Retry, _exceptions.Ignore))
_REJECT = cast("type[BaseException]", _exceptions.Reject)


def _runs_again(exc: BaseException) -> bool:
    """Whether Celery runs the current task again after `exc`: then it is no failure (yet)."""
    if isinstance(exc, _GOES_ON):
        return True
    if isinstance(exc, _REJECT):
        return bool(getattr(exc, "requeue", False))
    task = _current_task()
    if task is None or task.request.called_directly:
        # Called as a plain function, a task is never retried: retry() raises the error itself.
        return False
    # autoretry_for retries the run that raised, the way task.retry() does (celery.app.autoretry).
    autoretry_for = tuple(getattr(task, "autoretry_for", ()) or ())
    dont_autoretry_for = tuple(getattr(task, "dont_autoretry_for", ()) or ())
    if not autoretry_for or not isinstance(exc, autoretry_for) or isinstance(exc, dont_autoretry_for):
        return False
    retry_kwargs = getattr(task, "retry_kwargs", None) or {}
    # As autoretry decides: an override from an earlier retry(max_retries=...) comes first.
    max_retries = getattr(task, "override_max_retries", retry_kwargs.get("max_retries", task.max_retries))
    return max_retries is None or task.request.retries < max_retries


def _bound_task(args: Sequence[Any]) -> _Task | None:
    """The task a bound task's function gets as its first argument (`bind=True`), if any."""
    return cast("_Task", args[0]) if args and isinstance(args[0], _TASK_CLASS) else None


# -- the job -----------------------------------------------------------------------------


def _image_urls(value: object, what: str) -> list[str]:
    """`value` as a list of image URLs (None: no images); `TypeError` for anything else."""
    if value is None:
        return []
    if isinstance(value, list | tuple) and all(isinstance(url, str) for url in value):
        return list(value)
    raise TypeError(f"{what} must be a list of image URLs (str) or None, got {type(value).__name__}")


class DreamJob:
    """One dream's job as its watchers see it; a context manager (see `dream_progress`).

    Updates of one job are sent one at a time, in the order they are asked for, from any
    thread. Each carries the images of the update before it unless given others, since every
    `image_update` is the dream's whole state (a late client gets only the latest one).
    """

    def __init__(
        self,
        dream_id: int,
        *,
        delete: bool = False,
        settings: Settings | None = None,
        start_message: str | None = None,
        image_urls: Sequence[str] | None = None,
        failure_message: str | None = None,
    ) -> None:
        self.dream_id = dream_id
        self.delete = delete
        self.settings = settings
        if delete:
            self._statuses = (ImageStatus.DELETE_PROCESSING, ImageStatus.DELETE_COMPLETED, ImageStatus.DELETE_FAILED)
        else:
            self._statuses = (ImageStatus.PROCESSING, ImageStatus.COMPLETED, ImageStatus.FAILED)
        self.start_message = start_message
        self.failure_message = DEFAULT_FAILURE_MESSAGES[delete] if failure_message is None else failure_message
        if not isinstance(self.failure_message, str) or not self.failure_message:
            raise TypeError("failure_message must be a non-empty string")
        # Checked now, so a bad dream id or image list fails the caller before any work is done.
        image_update_message(dream_id, image_urls, self._statuses[0], start_message)
        self._images = _image_urls(image_urls, "image_urls")
        self._outcome: ImageStatus | None = None
        self._started = False
        self._publish_error: PublishError | None = None
        # Held while an update is sent: a progress update from another thread cannot overtake
        # the outcome, nor follow it.
        self._lock = threading.Lock()

    @property
    def outcome(self) -> ImageStatus | None:
        """The final status sent (completed or failed, or their delete forms), else None."""
        return self._outcome

    @property
    def images(self) -> list[str]:
        """The images of the last update sent."""
        return list(self._images)

    @property
    def publish_error(self) -> PublishError | None:
        """The last `PublishError` one of this job's updates raised, if any."""
        return self._publish_error

    def progress(self, percent: int, message: str | None = None, image_urls: Sequence[str] | None = None) -> None:
        """Send `processing` (`delete_processing`) with `progress` = `percent` (an int, 0-100)."""
        self._send(self._statuses[0], image_urls, message, percent, final=False)

    def complete(self, image_urls: Sequence[str] | None = None, message: str | None = None) -> None:
        """Send `completed` (`delete_completed`) with `image_urls` (None: no images)."""
        self._send(self._statuses[1], image_urls if image_urls is not None else [], message, None, final=True)

    def fail(self, message: str | None = None, image_urls: Sequence[str] | None = None) -> None:
        """Send `failed` (`delete_failed`) without raising: for a failure that is news, not an
        error. `message` reaches the watchers as is (default: `failure_message`)."""
        text = self.failure_message if message is None else message
        self._send(self._statuses[2], image_urls, text, None, final=True)

    def _send(
        self,
        status: ImageStatus,
        image_urls: Sequence[str] | None,
        message: str | None,
        percent: int | None,
        *,
        final: bool,
    ) -> None:
        with self._lock:
            if not self._started:
                raise RuntimeError("a DreamJob sends updates inside its `with` block")
            if self._outcome is not None:
                raise RuntimeError(f"dream {self.dream_id} is already {self._outcome}: nothing is sent after it")
            images = self._images if image_urls is None else _image_urls(image_urls, "image_urls")
            try:
                send_image_update(
                    self.dream_id,
                    image_urls=images,
                    status=status,
                    message=message,
                    progress=percent,
                    settings=self.settings,
                )
            except PublishError as exc:
                self._publish_error = exc
                raise
            self._images = images
            if final:
                self._outcome = status

    def _mark_started(self) -> None:
        """Take the job as started, without sending its start (which `__enter__` does next, and a
        retried task whose work was done before skips: only its outcome is left to send)."""
        if self._started:
            raise RuntimeError("a DreamJob is started once")
        self._started = True

    def __enter__(self) -> DreamJob:
        self._mark_started()
        self._send(self._statuses[0], None, self.start_message, None, final=False)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if self._outcome is not None:
            return  # told already: an error after the outcome is the caller's own business
        if exc is None:
            # Left like this, the watchers would wait on `processing` forever.
            self._report_failure()
            raise RuntimeError(
                f"the job of dream {self.dream_id} ended without complete() or fail(): reported as failed"
            )
        if exc is self._publish_error or not isinstance(exc, Exception) or _runs_again(exc):
            # A lost update of this job (the backend is away: the caller retries), a task that
            # Celery runs again, or an interruption (a worker shutting down): no outcome yet.
            return
        self._report_failure()

    def _report_failure(self) -> None:
        """Send `failed` with the safe message; a failure to do so is logged, never raised, so
        that the code's own error is the one its caller sees."""
        try:
            self.fail()
        except Exception as publish_error:
            logger.error(
                "dream %s: the %s update could not be published (%s); the job's own error follows",
                self.dream_id,
                self._statuses[2],
                type(publish_error).__name__,
                exc_info=publish_error,
                extra={"dream_ws": {"event": "failure_unreported", "dream_id": self.dream_id}},
            )


def dream_progress(
    dream_id: int,
    *,
    delete: bool = False,
    settings: Settings | None = None,
    start_message: str | None = None,
    image_urls: Sequence[str] | None = None,
    failure_message: str | None = None,
) -> DreamJob:
    """A context manager that tells a dream's watchers how its job goes.

    Entering sends `processing` (`delete_processing` with `delete=True`) with `start_message`
    and `image_urls`; inside, `job.progress(percent, message)` sends progress, and
    `job.complete(urls)` (or `job.fail(message)`) the outcome. A block that raises sends
    `failed` with `failure_message` (never the exception's text) and the exception goes on;
    a block that ends without an outcome sends `failed` too, and raises `RuntimeError`.

    Each update is a `send_image_update(..., settings=settings)`: `PublishError` when it cannot
    be published, after its own retries.
    """
    return DreamJob(
        dream_id,
        delete=delete,
        settings=settings,
        start_message=start_message,
        image_urls=image_urls,
        failure_message=failure_message,
    )


# -- the decorator -------------------------------------------------------------------------


def reports_dream(
    *,
    dream_arg: str = "dream_id",
    job_arg: str | None = None,
    delete: bool = False,
    settings: Settings | None = None,
    start_message: str | None = None,
    failure_message: str | None = None,
    retry_countdown: float | None = None,
) -> Callable[[Callable[..., R]], Callable[..., R]]:
    """Run a task's function in a `dream_progress` of the dream its `dream_arg` argument names.

    Put it under `@app.task`. The function's return value is the outcome: its image URLs
    (a list of str, or None for none) are sent as `completed`; anything else is an error,
    reported as `failed`. If the function sent the outcome itself (`job.complete(...)` or
    `job.fail(...)`), its return value is left alone.

    `job_arg` names a keyword-only parameter of the function (`*, job: DreamJob`) that gets
    the job, for `job.progress(...)`: nothing is injected unless asked for, and the parameter
    is hidden from the task's signature (callers cannot pass it; Celery checks calls against
    that signature).

    In a bound task, a `PublishError` of one of the job's updates retries the task (see the
    module's documentation), after `retry_countdown` seconds or the task's `default_retry_delay`.
    """

    def decorate(function: Callable[..., R]) -> Callable[..., R]:
        signature = inspect.signature(function)
        name = getattr(function, "__qualname__", repr(function))
        exposed = _task_signature(signature, dream_arg, job_arg, name)

        @functools.wraps(function)
        def run(*args: Any, **kwargs: Any) -> R:
            done = kwargs.pop(RESUME_KWARG, None)
            if job_arg is not None and job_arg in kwargs:
                raise TypeError(f"{name}: {job_arg!r} is given by reports_dream, not by the caller")
            dream_id = _dream_id(exposed, dream_arg, args, kwargs)
            job = DreamJob(
                dream_id, delete=delete, settings=settings, start_message=start_message, failure_message=failure_message
            )
            task = _bound_task(args)
            images: list[str] | None = None  # set once the work is done and only its outcome is left
            try:
                if done is not None:
                    images = _image_urls(done, RESUME_KWARG)
                    job._mark_started()
                    job.complete(images)
                    return cast("R", images)
                with job:
                    if job_arg is not None:
                        kwargs[job_arg] = job
                    result = function(*args, **kwargs)
                    if job.outcome is None:
                        images = _image_urls(result, f"the return value of {name}")
                        job.complete(images)
                    return result
            except PublishError as exc:
                if exc is not job.publish_error or task is None:
                    raise
                # kwargs in full: explicit kwargs replace the request's on retry, they are not merged.
                again = None if images is None else {**(task.request.kwargs or {}), RESUME_KWARG: images}
                raise task.retry(exc=exc, countdown=retry_countdown, kwargs=again) from exc

        # What Celery checks calls against (its task header) and what inspect shows.
        run.__dict__["__signature__"] = exposed
        return run

    return decorate


def _task_signature(signature: inspect.Signature, dream_arg: str, job_arg: str | None, name: str) -> inspect.Signature:
    """The function's signature as callers see it: no job parameter, and the keyword argument
    of a retry that only has the outcome left to send."""
    parameters = signature.parameters
    passable = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    if dream_arg not in parameters or parameters[dream_arg].kind not in passable:
        raise TypeError(f"reports_dream: {name} has no parameter {dream_arg!r} for the dream id (dream_arg)")
    if job_arg is not None:
        if job_arg not in parameters or parameters[job_arg].kind is not inspect.Parameter.KEYWORD_ONLY:
            raise TypeError(f"reports_dream: {name} needs a keyword-only parameter {job_arg!r} (job_arg) for the job")
        if job_arg == dream_arg:
            raise TypeError("reports_dream: dream_arg and job_arg name the same parameter")
    if RESUME_KWARG in parameters:
        raise TypeError(f"reports_dream: {RESUME_KWARG!r} is the helper's own keyword argument")
    kept = [parameter for parameter in parameters.values() if parameter.name != job_arg]
    resume = inspect.Parameter(RESUME_KWARG, inspect.Parameter.KEYWORD_ONLY, default=None)
    # Keyword-only parameters come before **kwargs.
    at = len(kept) - 1 if kept and kept[-1].kind is inspect.Parameter.VAR_KEYWORD else len(kept)
    kept.insert(at, resume)
    return signature.replace(parameters=kept)


def _dream_id(exposed: inspect.Signature, dream_arg: str, args: Sequence[Any], kwargs: dict[str, Any]) -> int:
    """The dream id the call names; `TypeError` for a call the function would refuse anyway."""
    bound = exposed.bind(*args, **kwargs)
    bound.apply_defaults()
    return cast("int", bound.arguments[dream_arg])
