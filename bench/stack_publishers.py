"""Each stack's own way of publishing an update, behind two small interfaces.

`open_publisher` (async): what an async endpoint or task would call; `open_sync_publisher`
(sync): what a Celery worker calls, one blocking call per update, no event loop of its own.
"""

from __future__ import annotations

from typing import Protocol

from starlette_dream_ws import Settings, asend_image_update, send_image_update

STACKS = ("ours", "ours-granian", "channels", "ceiling", "ceiling-tasks", "sse-starlette")
#: Stacks served by our package (same producer), and stacks fed as the ceiling is.
OURS = frozenset({"ours", "ours-granian"})
CEILING_FED = frozenset({"ceiling", "ceiling-tasks"})


class Publisher(Protocol):
    async def publish(self, dream_id: int, message: str | None) -> None: ...

    async def aclose(self) -> None: ...


class SyncPublisher(Protocol):
    def publish(self, dream_id: int, message: str | None) -> None: ...

    def close(self) -> None: ...


class OursPublisher:
    """`asend_image_update`, as an async endpoint or task of an integrator would call it."""

    def __init__(self, redis_url: str) -> None:
        self.settings = Settings(broadcast_url=redis_url)

    async def publish(self, dream_id: int, message: str | None) -> None:
        await asend_image_update(dream_id, status="processing", message=message, settings=self.settings)

    async def aclose(self) -> None:
        """Nothing to do: the connection `asend_image_update` keeps per loop ends with the process."""


class OursSyncPublisher:
    """`send_image_update`, as a Celery task calls it. The settings are made once, as a worker
    keeps them (from its configuration) for the life of the process."""

    def __init__(self, redis_url: str) -> None:
        self.settings = Settings(broadcast_url=redis_url)

    def publish(self, dream_id: int, message: str | None) -> None:
        send_image_update(dream_id, status="processing", message=message, settings=self.settings)

    def close(self) -> None:
        """Nothing to do: the producer's connections end with the process (and at exit)."""


class PlainSyncPublisher:
    """A plain sync PUBLISH of the finished update JSON: the sse-starlette baseline's producer
    (it forwards whatever Redis carries)."""

    def __init__(self, redis_url: str) -> None:
        import redis

        self.client = redis.Redis.from_url(redis_url, single_connection_client=True)

    def publish(self, dream_id: int, message: str | None) -> None:
        from bench.servers.ceiling import channel_name, update_json

        self.client.publish(channel_name(dream_id), update_json(dream_id, message))

    def close(self) -> None:
        self.client.close()


async def open_publisher(stack: str, redis_url: str) -> Publisher:
    if stack in OURS:
        return OursPublisher(redis_url)
    if stack == "channels":
        from bench.servers.channels_app.publish import open_channels_publisher

        return await open_channels_publisher(redis_url)
    if stack in CEILING_FED or stack == "sse-starlette":
        # Each forwards the finished update as Redis carries it.
        from bench.servers.ceiling import open_ceiling_publisher

        return await open_ceiling_publisher(redis_url)
    raise ValueError(f"unknown stack {stack!r}; one of {STACKS}")


def open_sync_publisher(stack: str, redis_url: str) -> SyncPublisher:
    if stack in OURS:
        return OursSyncPublisher(redis_url)
    if stack == "channels":
        from bench.servers.channels_app.publish import open_channels_sync_publisher

        return open_channels_sync_publisher(redis_url)
    if stack in CEILING_FED:
        from bench.servers.ceiling import SyncCeilingPublisher

        return SyncCeilingPublisher(redis_url)
    if stack == "sse-starlette":
        return PlainSyncPublisher(redis_url)
    raise ValueError(f"unknown stack {stack!r}; one of {STACKS}")
