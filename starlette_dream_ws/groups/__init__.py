"""Groups: membership and fan-out in each process, on one backend contract (`contract.py`),
with one backend per file in `backends/`. Depends on `protocol` and `settings` only."""

from ..protocol import Position
from .contract import Backend, BackendConnectionLost, History, Published
from .events import GroupEvent
from .layer import GroupLayer
from .membership import Member
from .publishing import BackendUnavailable, PublishError

__all__ = [
    "Backend",
    "BackendConnectionLost",
    "BackendUnavailable",
    "GroupEvent",
    "GroupLayer",
    "History",
    "Member",
    "Position",
    "PublishError",
    "Published",
]
