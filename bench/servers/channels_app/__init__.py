"""The benchmark contract (bench/README.md) on Django Channels 4 + channels_redis, as a Channels user would write it."""
