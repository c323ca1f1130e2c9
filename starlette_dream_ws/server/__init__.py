"""The server: the mountable app, consumers and their connections, auth, limits, heartbeat,
metrics. Depends on `protocol`, `groups` and `settings`."""
