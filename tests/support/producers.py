"""Producers in another process: `send_image_update` called from a plain Python process."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .processes import POLL_INTERVAL, clean_env, popen, stop_process

#: One process, several `send_image_update` calls (one backend connection), each outcome as JSON.
PRODUCER_SCRIPT = """
import json, sys, time
from starlette_dream_ws import send_image_update
outcomes = []
for call in json.load(sys.stdin):
    # A steady stream of updates, as a worker's progress would be (the producer's pace).
    time.sleep(call.pop("pause_before", 0))
    try:
        send_image_update(**call)
    except Exception as exc:
        outcomes.append({"error": type(exc).__name__, "message": str(exc)})
    else:
        outcomes.append({"ok": True})
print(json.dumps(outcomes), flush=True)
"""


def producer_call(
    dream_id: int, image_urls: Sequence[str] | None = None, status: str = "processing", message: str | None = None
) -> dict[str, Any]:
    """One `send_image_update` call, as `run_producer` takes it."""
    return {
        "dream_id": dream_id,
        "image_urls": None if image_urls is None else list(image_urls),
        "status": status,
        "message": message,
    }


class ProducerProcess:
    """A plain Python process calling the sync producer; its stderr goes to a file to watch."""

    def __init__(
        self, redis_url: str, calls: Sequence[Mapping[str, Any]], env: Mapping[str, str] | None = None
    ) -> None:
        self._tmp = Path(tempfile.mkdtemp(prefix="dream-ws-producer-"))
        self.stderr_path = self._tmp / "stderr.log"
        self.stdout_path = self._tmp / "stdout.log"
        stdin_path = self._tmp / "calls.json"
        stdin_path.write_text(json.dumps(list(calls)))
        environment = clean_env({"DREAM_WS_BROADCAST_URL": redis_url, **(env or {})})
        with stdin_path.open("rb") as stdin, self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.process = popen(
                [sys.executable, "-c", PRODUCER_SCRIPT], env=environment, stdin=stdin, stdout=out, stderr=err
            )

    def stderr_text(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait_for_stderr(self, text: str, timeout: float = 10.0) -> None:
        """Poll the process's stderr until `text` shows up."""
        deadline = time.monotonic() + timeout
        while text not in self.stderr_text():
            if self.process.poll() is not None and text not in self.stderr_text():
                raise AssertionError(
                    f"producer exited ({self.process.returncode}) before {text!r}:\n{self.stderr_text()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not in the producer's stderr after {timeout}s:\n{self.stderr_text()}")
            time.sleep(POLL_INTERVAL)

    def result(self, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Wait for the process to end; the outcome of each call, in order."""
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"producer still running after {timeout}s:\n{self.stderr_text()}") from None
        finally:
            stop_process(self.process, kill=True)  # SIGKILL after a timeout; once it has exited, only forgets it
        stdout = self.stdout_path.read_text()
        try:
            if self.process.returncode != 0:
                raise ValueError("non-zero exit")
            outcomes: list[dict[str, Any]] = json.loads(stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise AssertionError(
                f"producer failed ({self.process.returncode}):\nstdout: {stdout}\nstderr: {self.stderr_text()}"
            ) from None
        finally:
            shutil.rmtree(self._tmp, ignore_errors=True)
        return outcomes


def run_producer(
    redis_url: str, calls: Sequence[Mapping[str, Any]], env: Mapping[str, str] | None = None, timeout: float = 30.0
) -> list[dict[str, Any]]:
    """Run `send_image_update(**call)` for each call, in ONE separate process; returns the outcomes."""
    completed = subprocess.run(
        [sys.executable, "-c", PRODUCER_SCRIPT],
        input=json.dumps(list(calls)).encode(),
        env=clean_env({"DREAM_WS_BROADCAST_URL": redis_url, **(env or {})}),
        capture_output=True,
        timeout=timeout,
        check=False,
    )
    stdout, stderr = completed.stdout.decode(errors="replace"), completed.stderr.decode(errors="replace")
    try:
        if completed.returncode != 0:
            raise ValueError("non-zero exit")
        outcomes: list[dict[str, Any]] = json.loads(stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise AssertionError(f"producer failed ({completed.returncode}):\nstdout: {stdout}\nstderr: {stderr}") from None
    return outcomes
