"""The wire contract (docs/PROTOCOL.md): message shapes, statuses, close codes, group names.

Plain data and functions: no Starlette, no backend. The server, the groups layer and the
producers all speak through these names, so a message is shaped in exactly one place.
"""

from __future__ import annotations

import enum
import itertools
import json
import os
import re
import secrets
import time
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

#: The subprotocol a client offers (and the server selects) to speak this protocol.
SUBPROTOCOL = "dream-ws.v1"
#: A token sent as a subprotocol: `dream-ws.bearer.<jwt>`, offered beside `SUBPROTOCOL`.
TOKEN_SUBPROTOCOL_PREFIX = "dream-ws.bearer."


class CloseCodes:
    """Close codes of the protocol."""

    NORMAL = 1000
    GOING_AWAY = 1001
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    TRY_AGAIN_LATER = 1013
    UNAUTHENTICATED = 4401
    FORBIDDEN = 4403
    HEARTBEAT_TIMEOUT = 4408


class ImageStatus(enum.StrEnum):
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    DELETE_PROCESSING = "delete_processing"
    DELETE_COMPLETED = "delete_completed"
    DELETE_FAILED = "delete_failed"


STATUSES = frozenset(status.value for status in ImageStatus)


_EPOCH = re.compile(r"[A-Za-z0-9_-]{1,32}")
#: Largest `seq` a client may name (JavaScript's largest safe integer).
MAX_SEQ = 2**53 - 1


class Position(NamedTuple):
    """Where an update stands in its group's history: `seq` counts the group's updates (1 for
    the first) within one unbroken history named `epoch`. Text form: `<epoch>:<seq>`.

    A named tuple: one is made for every message a process receives, and it must be cheap.
    Compare two with `follows`, not `<` (seqs of different epochs do not compare)."""

    epoch: str
    seq: int

    def __str__(self) -> str:
        return f"{self.epoch}:{self.seq}"

    def follows(self, other: Position | None) -> bool:
        """Whether this position comes after `other`: a later `seq` of the same epoch, or any
        position of another epoch (that history was lost; this one is what is true now)."""
        return other is None or self[0] != other[0] or self[1] > other[1]

    @classmethod
    def parse(cls, text: str) -> Position:
        """`<epoch>:<seq>` as a position; `ValueError` for anything else."""
        epoch, sep, seq = text.rpartition(":")
        if not sep or not _EPOCH.fullmatch(epoch) or not seq.isascii() or not seq.isdigit() or len(seq) > 16:
            raise ValueError("a position is <epoch>:<seq>")
        value = int(seq)
        if value > MAX_SEQ:
            raise ValueError("seq is too large")
        return cls(epoch, value)


def new_epoch() -> str:
    """A fresh epoch name: a random prefix of this process and a counter (every publish offers
    one, in case the group has none, so it must be cheap), never the same twice."""
    return _epoch_prefix + _base36(next(_epoch_counter))


def _base36(number: int) -> str:
    digits = ""
    while True:
        number, digit = divmod(number, 36)
        digits = "0123456789abcdefghijklmnopqrstuvwxyz"[digit] + digits
        if not number:
            return digits


def _new_epoch_prefix() -> None:
    # A forked child (Celery's prefork pool) must not repeat its parent's names.
    global _epoch_prefix, _epoch_counter
    _epoch_prefix, _epoch_counter = secrets.token_urlsafe(9), itertools.count()


_epoch_prefix = ""
_epoch_counter = itertools.count()
_new_epoch_prefix()
os.register_at_fork(after_in_child=_new_epoch_prefix)


def with_position(content: dict[str, Any], text: str, position: Position) -> tuple[dict[str, Any], str]:
    """A freshly decoded group event (changed in place) and its JSON text, with `seq` and
    `epoch` added. The text is spliced, not encoded again, when it is a plain JSON object
    without them (as producers publish it)."""
    splice = text.startswith("{") and not text.startswith("{}") and "seq" not in content and "epoch" not in content
    content["seq"], content["epoch"] = position.seq, position.epoch  # a fresh dict: no copy
    if splice:
        return content, f'{{"seq":{position.seq},"epoch":"{position.epoch}",{text[1:]}'
    return content, encode(content)


def encode(message: dict[str, Any]) -> str:
    """A message as the compact JSON text that goes on the wire (and through the backends)."""
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False)


def error_message(code: str, message: str) -> dict[str, Any]:
    return {"type": "error", "code": code, "message": message}


#: What a message `type` may be: lower case, digits, `_` and `.` (`.` maps to `_` in handler
#: names, as in Channels). Anything else is answered with `unknown_type` / `unknown_event`.
TYPE_NAME = re.compile(r"[a-z][a-z0-9_.]{0,63}")
#: What a group name may be: what every backend keeps as is (PostgreSQL truncates channel names
#: past 63 bytes; a brace would break the hash tag that keeps a Redis Cluster group in one slot).
GROUP_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,63}")
#: What a job id taken from a URL may be, so that `job_group` always makes a valid group name.
JOB_ID = re.compile(r"[A-Za-z0-9_.:-]{1,48}")


def check_group(group: str) -> str:
    """`group` if it is a valid group name, else `ValueError` (or `TypeError`)."""
    if not isinstance(group, str):
        raise TypeError(f"a group name is a string, got {type(group).__name__}")
    if not GROUP_NAME.fullmatch(group):
        raise ValueError(f"a group name is 1 to 63 of A-Z a-z 0-9 _ . : - , got {group[:80]!r}")
    return group


def check_event(event: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a group event if it can be published: a JSON object whose `type` follows
    `TYPE_NAME` (the consumer's handler for it is `type` with `.` as `_`). Raises `ValueError`
    or `TypeError` before anything is published."""
    if not isinstance(event, Mapping):
        raise TypeError(f"an event is a mapping (a JSON object), got {type(event).__name__}")
    kind = event.get("type")
    if not isinstance(kind, str) or not TYPE_NAME.fullmatch(kind):
        raise ValueError(f"an event needs a 'type' matching {TYPE_NAME.pattern}, got {kind!r}")
    content = dict(event)
    try:
        json.dumps(content, allow_nan=False, ensure_ascii=False).encode("utf-8")
    except (TypeError, ValueError, RecursionError, UnicodeEncodeError) as exc:
        raise ValueError(f"an event must be plain JSON: {exc}") from None
    return content


def job_group(kind: str, job_id: object) -> str:
    """The group every connection watching job `job_id` of `kind` joins: `<kind>_<job_id>`
    (a UUID in its canonical text form). `ValueError` if that is not a valid group name."""
    return check_group(f"{kind}_{job_id}")


#: The group kind of dreams: `dream_images_<dream_id>`.
DREAM_GROUP_KIND = "dream_images"


def dream_group(dream_id: int) -> str:
    """The group every connection watching `dream_id` joins."""
    return f"{DREAM_GROUP_KIND}_{dream_id}"


def image_update_message(
    dream_id: int,
    image_urls: Sequence[str] | None = None,
    status: str = "processing",
    message: str | None = None,
    progress: int | None = None,
) -> dict[str, Any]:
    """Validate an update and build the `image_update` message clients receive.

    `progress` (0-100, optional) is how far the job has got; it is only sent when given.
    Raises `ValueError` (or `TypeError`) before anything is published.
    """
    if isinstance(dream_id, bool) or not isinstance(dream_id, int):
        raise TypeError(f"dream_id must be an int, got {type(dream_id).__name__}")
    if dream_id <= 0:
        raise ValueError(f"dream_id must be positive, got {dream_id}")
    status = str(status.value) if isinstance(status, ImageStatus) else status
    if status not in STATUSES:
        raise ValueError(f"status must be one of {sorted(STATUSES)}, got {status!r}")
    if isinstance(image_urls, str | bytes):
        raise TypeError("image_urls must be a list of URL strings, not one string")
    images = list(image_urls or ())
    if not all(isinstance(url, str) for url in images):
        raise TypeError("image_urls must be a list of URL strings")
    if message is not None and not isinstance(message, str):
        raise TypeError("message must be a string or None")
    update = {
        "type": "image_update",
        "dream_id": dream_id,
        "status": status,
        "images": images,
        "timestamp": time.time(),
        "message": message,
    }
    if progress is not None:
        update["progress"] = check_progress(progress)
    return update


def check_progress(progress: int) -> int:
    """A percentage, 0 to 100 (an int: a float would promise precision nobody measured)."""
    if isinstance(progress, bool) or not isinstance(progress, int):
        raise TypeError(f"progress must be an int from 0 to 100, got {type(progress).__name__}")
    if not 0 <= progress <= 100:
        raise ValueError(f"progress must be from 0 to 100, got {progress}")
    return progress
