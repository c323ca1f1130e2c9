"""Each stack's own way of publishing an update, behind one small interface."""

from __future__ import annotations

from typing import Protocol

from starlette_dream_ws import Settings, asend_image_update

STACKS = ("ours", "channels", "ceiling", "sse-starlette")


class Publisher(Protocol):
    async def publish(self, dream_id: int, message: str | None) -> None: ...

    async def aclose(self) -> None: ...


class OursPublisher:
    """`asend_image_update`, as an async endpoint or task of an integrator would call it."""

    def __init__(self, redis_url: str) -> None:
        self.settings = Settings(broadcast_url=redis_url)

    async def publish(self, dream_id: int, message: str | None) -> None:
        await asend_image_update(dream_id, status="processing", message=message, settings=self.settings)

    async def aclose(self) -> None:
        """Nothing to do: the connection `asend_image_update` keeps per loop ends with the process."""


async def open_publisher(stack: str, redis_url: str) -> Publisher:
    if stack == "ours":
        return OursPublisher(redis_url)
    if stack == "channels":
        from bench.servers.channels_app.publish import open_channels_publisher

        return await open_channels_publisher(redis_url)
    if stack in ("ceiling", "sse-starlette"):
        # Both forward the finished update as Redis carries it.
        from bench.servers.ceiling import open_ceiling_publisher

        return await open_ceiling_publisher(redis_url)
    raise ValueError(f"unknown stack {stack!r}; one of {STACKS}")
