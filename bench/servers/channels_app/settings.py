"""Minimal Django settings: no database, no HTTP views, one Redis channel layer.

`BENCH_REDIS_URL` is required: a silent fallback could point the benchmark at the wrong server.
"""

import os

SECRET_KEY = "bench-only-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]

INSTALLED_APPS = ["channels"]

# An empty URLconf: a stray HTTP request gets a plain 404 instead of a server error.
ROOT_URLCONF = __name__
urlpatterns: list[object] = []

ASGI_APPLICATION = "bench.servers.channels_app.asgi.application"

CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        "CONFIG": {
            # redis-py 8 reads with a 5 s socket timeout by default, which races the layer's own 5 s
            # BZPOPMIN and kills every consumer idle for 5 s (channels_redis issue #422): the usual
            # fix is no socket timeout, as before redis-py 8.
            # redis-py's pool allows 100 connections and then raises instead of waiting; a burst of
            # handshakes (each group_add takes one) passes that, so the pool is made larger.
            "hosts": [{"address": os.environ["BENCH_REDIS_URL"], "socket_timeout": None, "max_connections": 2000}],
            # The other stacks buffer up to 1000 events per connection; channels_redis applies
            # `capacity` (default 100) both to a process's inbox in Redis, where a group_send past it
            # is dropped, and to each consumer's local buffer, which drops its oldest message past it.
            # Everything else stays at the defaults (expiry 60 s, group_expiry 86400 s, msgpack).
            "capacity": 1000,
        },
    },
}
