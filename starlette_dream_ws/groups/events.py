"""A group event as the members of one process share it."""

from __future__ import annotations

from typing import Any, NoReturn

from ..protocol import Position


class GroupEvent(dict[str, Any]):
    """A group event as members get it, with the JSON text it arrived as.

    One instance is shared by every local member, so it is read-only (copy it to change it:
    `{**event, ...}`), and a consumer forwarding it unchanged sends `text` as is: each message
    is decoded and encoded once per process, however many connections receive it.
    """

    __slots__ = ("frame", "group", "position", "text")

    def __init__(self, content: dict[str, Any], text: str, group: str = "", position: Position | None = None) -> None:
        super().__init__(content)
        self.text = text
        #: The group it was published to, and its place in the group's history (None: published
        #: without one, by someone else).
        self.group = group
        self.position = position
        #: What a transport made of `text` (an ASGI message), kept for the next connection.
        self.frame: Any = None

    def _read_only(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise TypeError("a group event is shared by every member: copy it to change it")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = __ior__ = _read_only
