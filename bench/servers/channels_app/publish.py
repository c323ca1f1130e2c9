"""Publishing the Channels way: `group_send` on the configured channel layer."""

import os
import time

import django
from asgiref.sync import async_to_sync
from channels.layers import BaseChannelLayer, get_channel_layer

SETTINGS_MODULE = "bench.servers.channels_app.settings"


class ChannelsPublisher:
    """Sends image updates to a dream's group, as a Django view or task would."""

    def __init__(self, layer: BaseChannelLayer) -> None:
        self.layer = layer

    async def publish(self, dream_id: int, message: str | None) -> None:
        """Send one `image.update` to every consumer of the dream."""
        # Spelled out rather than imported from consumers, which needs BENCH_JWT_SECRET at import.
        await self.layer.group_send(
            f"dream_images_{dream_id}",
            {
                "type": "image.update",
                "dream_id": dream_id,
                "status": "processing",
                "images": [],
                "timestamp": time.time(),
                "message": message,
            },
        )

    async def aclose(self) -> None:
        """Close the layer's Redis connections on this event loop."""
        await self.layer.close_pools()


async def open_channels_publisher(redis_url: str) -> ChannelsPublisher:
    """Configure Django for this process (once, before anything reads settings) and return a publisher."""
    os.environ["BENCH_REDIS_URL"] = redis_url
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", SETTINGS_MODULE)
    django.setup()
    layer = get_channel_layer()
    if layer is None:
        raise RuntimeError("CHANNEL_LAYERS has no default layer")
    return ChannelsPublisher(layer)


class ChannelsSyncPublisher:
    """`async_to_sync(channel_layer.group_send)`, as the Channels documentation has a Celery
    task or a sync view send to a group."""

    def __init__(self, layer: BaseChannelLayer) -> None:
        self.layer = layer
        self.group_send = async_to_sync(layer.group_send)

    def publish(self, dream_id: int, message: str | None) -> None:
        self.group_send(
            f"dream_images_{dream_id}",
            {
                "type": "image.update",
                "dream_id": dream_id,
                "status": "processing",
                "images": [],
                "timestamp": time.time(),
                "message": message,
            },
        )

    def close(self) -> None:
        """Nothing to close here: each `async_to_sync` call runs on a loop of its own, whose end
        channels_redis closes the connections of."""


def open_channels_sync_publisher(redis_url: str) -> ChannelsSyncPublisher:
    """Configure Django for this process and return a sync publisher."""
    os.environ["BENCH_REDIS_URL"] = redis_url
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", SETTINGS_MODULE)
    django.setup()
    layer = get_channel_layer()
    if layer is None:
        raise RuntimeError("CHANNEL_LAYERS has no default layer")
    return ChannelsSyncPublisher(layer)
