"""ASGI entry point: `uvicorn bench.servers.channels_app.asgi:application`."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.servers.channels_app.settings")
# Set Django up before anything imports models or settings-dependent code.
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.urls import path  # noqa: E402

from .consumers import DreamConsumer  # noqa: E402

# No AuthMiddlewareStack: the token travels in the subprotocol and the consumer checks it.
application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        "websocket": URLRouter([path("dreams/<int:dream_id>", DreamConsumer.as_asgi())]),
    }
)
