"""Resume: a client that has seen updates reconnects with `since=<epoch>:<seq>` and gets
every update it missed, in order, before the live ones, or, if that is no longer possible,
the latest state (docs/PROTOCOL.md, "Positions").

The hand-over from history to live needs no lock: the connection joins the group first, so
live events wait in its outbox while the history is read and sent, and the outbox then sends
only what is newer than what went out (`Connection.send_json`): no gap, no duplicate.
"""

from __future__ import annotations

import dataclasses

from starlette.datastructures import Headers, QueryParams
from starlette.types import Scope

from ..groups import GroupEvent, GroupLayer
from ..protocol import CloseCodes, Position
from .connection import CloseConnection

#: Where a client names the position it resumes from: the query (WebSocket and SSE), and for
#: SSE the header `EventSource` sends when it reconnects, which wins.
SINCE_QUERY = "since"
LAST_EVENT_ID = "last-event-id"


def requested_position(scope: Scope) -> Position | None:
    """The position the client resumes from, if it names one; `invalid_since` (1008) if malformed."""
    text = Headers(scope=scope).get(LAST_EVENT_ID) if scope["type"] == "http" else None
    if text is None:
        text = QueryParams(scope.get("query_string", b"")).get(SINCE_QUERY)
    if text is None:
        return None
    try:
        return Position.parse(text)
    except ValueError:
        raise CloseConnection(
            CloseCodes.POLICY_VIOLATION, "invalid_since", "since must be <epoch>:<seq> from a position sent earlier"
        ) from None


@dataclasses.dataclass(frozen=True, slots=True)
class Resumption:
    """What a resuming connection is told, and then sent."""

    #: Whether `events` are every update after the client's position.
    recovered: bool
    #: The group's position now.
    current: Position
    #: The missed updates in order (recovered), or the latest state if there is one (not).
    events: list[GroupEvent]


async def resume(layer: GroupLayer, group: str, since: Position) -> Resumption:
    replay = await layer.replay(group, since)
    if replay.complete:
        return Resumption(True, replay.current, replay.events)
    latest = await layer.latest(group)
    return Resumption(False, replay.current, [latest] if latest is not None else [])
