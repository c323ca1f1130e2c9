"""A consumer for any kind of job: one path parameter names the job, its group carries the updates.

`DreamImagesConsumer` is one of these; another job kind is a subclass naming its group kind and
forwarding its event types::

    class RenderConsumer(JobConsumer):
        group_kind = "video_renders"      # producers: publish(job_group("video_renders", id), event)

        async def render_update(self, event):
            await self.send_json(event)

    app = ConsumerApp({"/renders/{render_id:uuid}": RenderConsumer}, authorize=can_watch)

Ids may come from any path converter (int, str, uuid): they must make a valid group name
(`protocol.JOB_ID`), and are sent to clients as JSON numbers (int) or strings (the rest).
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

from ..groups import GroupEvent
from ..protocol import JOB_ID, SUBPROTOCOL, CloseCodes, job_group
from .connection import CloseConnection
from .consumer import Consumer
from .outbox import StatusAnswer
from .resume import requested_position
from .schemas import JOBS


class JobConsumer(Consumer):
    """Streams one job's updates: greeting, catch-up from `since`, live events, `request_status`,
    `refresh_token`, `ping`. Subclasses set `group_kind` and add a handler per event type."""

    subprotocol = SUBPROTOCOL
    message_schemas = JOBS
    #: Groups are `<group_kind>_<job id>` (`protocol.job_group`), what producers publish to.
    group_kind: ClassVar[str] = "jobs"
    #: The path parameter that names the job; None: the route's only one.
    id_param: ClassVar[str | None] = None

    @property
    def id_name(self) -> str:
        """The name of the job id: the path parameter, also the greeting's key."""
        if self.id_param is not None:
            return self.id_param
        params = self.scope.get("path_params") or {}
        if len(params) != 1:
            raise TypeError(f"{type(self).__name__} needs id_param: its route has {len(params)} path parameters")
        return str(next(iter(params)))

    @property
    def job_id(self) -> Any:
        """The job id as the path converter made it (int, str, UUID...)."""
        return self.scope["path_params"][self.id_name]

    @property
    def job_id_json(self) -> int | str:
        """The job id as clients see it: a JSON number for an int, else its text (a UUID's
        canonical form)."""
        job_id = self.job_id
        return job_id if isinstance(job_id, int) and not isinstance(job_id, bool) else str(job_id)

    @property
    def group_name(self) -> str:
        return job_group(self.group_kind, self.job_id)

    def check_job_id(self) -> None:
        """Refuse ids that cannot name a group (1008 `invalid_id`); override to add rules."""
        if not JOB_ID.fullmatch(str(self.job_id)):
            raise CloseConnection(CloseCodes.POLICY_VIOLATION, "invalid_id", "ids are 1 to 48 of A-Z a-z 0-9 _ . : -")

    def authorization_target(self) -> Any:
        return self.job_id

    async def connect(self) -> None:
        self.check_job_id()
        since = requested_position(self.scope)
        await super().connect()
        group = self.group_name
        await self.group_add(group)
        greeting = self.greeting()
        events: list[GroupEvent] = []
        position = self.layer.position(group)
        if since is not None:
            resumed = await self.resume(group, since)
            greeting["recovered"], events = resumed.recovered, resumed.events
            position = resumed.current if resumed.current.follows(position) else position
        if position is not None:
            greeting["epoch"], greeting["seq"] = position.epoch, position.seq
        await self.send_json(greeting)
        for event in events:
            await self.send_json(event)

    def greeting(self) -> dict[str, Any]:
        """The first message (`connection_established`); override to add fields."""
        return {
            "type": "connection_established",
            self.id_name: self.job_id_json,
            "heartbeat_interval": self.settings.heartbeat_interval,
        }

    # -- client messages --------------------------------------------------------------------

    async def receive_ping(self, content: dict[str, Any]) -> None:
        """Answered with `pong`, echoing `timestamp`."""
        pong: dict[str, Any] = {"type": "pong"}
        if "timestamp" in content:
            pong["timestamp"] = content["timestamp"]
        try:
            # Echoed as sent, unless it cannot be valid JSON in a text frame (NaN, lone surrogates).
            text = json.dumps(pong, allow_nan=False, ensure_ascii=False, separators=(",", ":"))
            text.encode("utf-8")
        except (ValueError, RecursionError, UnicodeEncodeError):
            await self.send_error("invalid_message", "the timestamp cannot be echoed as JSON")
            return
        await self.send_text(text)

    async def receive_pong(self, content: dict[str, Any]) -> None:
        """Liveness only: any frame already counts."""

    async def receive_request_status(self, content: dict[str, Any]) -> None:
        """Answered with the job's latest update (or `status_unknown`), never older than one
        already sent on this connection."""
        requested = content.get(self.id_name, self.job_id_json)
        if isinstance(requested, bool) or not isinstance(requested, int | str):
            await self.send_error("invalid_message", f"{self.id_name} must be an integer or a string")
            return
        if str(requested) != str(self.job_id):
            await self.send_error("forbidden", "this connection may only ask about its own job")
            return
        try:
            latest = await self.layer.latest(self.group_name)
        except Exception:
            await self.send_error("unavailable", "the latest status cannot be read right now")
            return
        if latest is None:
            latest = self.last_sent(self.group_name)
        if latest is None:
            await self.send_error("status_unknown", "no update has been recorded for this job yet")
            return
        # Through the outbox, in order with the live updates: the answer is never older.
        self.outbox.put_now(StatusAnswer(latest))

    async def receive_refresh_token(self, content: dict[str, Any]) -> None:
        """Replace the connection's token before it expires; it must name the same user, who
        is authorized again (a user whose access was revoked gets 4403, not more updates)."""
        token = content.get("token")
        verifier = self.context.verifier
        if verifier is None:
            await self.send_error("unsupported", "this server does not authenticate with tokens")
            return
        if not isinstance(token, str):
            await self.send_error("invalid_message", "refresh_token needs a 'token' string")
            return
        try:
            user = verifier.verify(token)
        except Exception:
            raise CloseConnection(CloseCodes.UNAUTHENTICATED, "unauthenticated", "the new token is not valid") from None
        if self.user is None or user.id != self.user.id:
            raise CloseConnection(CloseCodes.UNAUTHENTICATED, "unauthenticated", "the new token is for another user")
        self.user = user
        if not await self.authorize():
            raise CloseConnection(CloseCodes.FORBIDDEN, "forbidden", "you may no longer watch this")
        await self.send_json({"type": "token_refreshed", "expires_at": user.expires_at})
