"""What the test suites (and the benchmark) share: real processes on 127.0.0.1 and the tokens for them.

- `processes`: starting and stopping processes so that none outlives the run; `ServerProcess`.
- `redis`, `postgres`, `uvicorn`: the servers (`RedisServer`, `PostgresServer`, `UvicornServer`).
- `producers`: `send_image_update` called from another process.
- `tokens`: the servers' JWT secrets and tokens signed with them.
- `browser`: finding and launching Debian's Chromium for the browser tests.

The conftests hold only fixtures and hooks; test modules import their helpers from here.
"""
