"""The demo app (examples/demo.py) and the browser client (static/dream-ws.js).

The demo is tested in-process: its lifespan is entered by hand, since the in-process
transport runs none. The client is checked with node: syntax, behaviour against a fake
WebSocket, and end to end against the demo served by `python examples/demo.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import os
import queue
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from httpx_ws import AsyncWebSocketSession, WebSocketDisconnect, aconnect_ws
from httpx_ws.transport import ASGIWebSocketTransport

from starlette_dream_ws import SUBPROTOCOL, TOKEN_SUBPROTOCOL_PREFIX

ROOT = Path(__file__).resolve().parents[1]
CLIENT = ROOT / "starlette_dream_ws" / "static" / "dream-ws.js"
NODE = shutil.which("node")
TIMEOUT = 5.0

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
demo = importlib.import_module("examples.demo")


@pytest.fixture
def fast_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo, "STEP_DELAY", 0.01)


@contextlib.asynccontextmanager
async def running_demo() -> AsyncIterator[httpx.AsyncClient]:
    """The demo app with its lifespan (and so its worker) running, and a client for it."""
    async with (
        demo.app.router.lifespan_context(demo.app),
        ASGIWebSocketTransport(demo.app) as transport,
        httpx.AsyncClient(transport=transport, base_url="http://testserver") as client,
    ):
        yield client


@contextlib.asynccontextmanager
async def connect(client: httpx.AsyncClient, dream_id: int, token: str) -> AsyncIterator[AsyncWebSocketSession]:
    """A WebSocket to the dream, with the token in the subprotocol list as the browser client sends it."""
    session: AsyncWebSocketSession
    async with aconnect_ws(
        f"/ws/dreams/{dream_id}",
        client,
        subprotocols=[SUBPROTOCOL, TOKEN_SUBPROTOCOL_PREFIX + token],
        keepalive_ping_interval_seconds=None,
    ) as session:
        yield session


async def demo_token(client: httpx.AsyncClient) -> str:
    response = await client.get("/demo-token")
    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store"
    token = response.json()["token"]
    assert isinstance(token, str)
    return token


# -- the demo, in-process ------------------------------------------------------------------


@pytest.mark.anyio
async def test_page_loads_the_client_from_the_mount(fast_worker: None) -> None:
    async with running_demo() as client:
        response = await client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert '<script type="module">' in response.text
    assert "from '/ws/dream-ws.js'" in response.text


@pytest.mark.anyio
async def test_client_script_is_served_as_javascript(fast_worker: None) -> None:
    async with running_demo() as client:
        response = await client.get("/ws/dream-ws.js")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/javascript")
    assert response.text == CLIENT.read_text(encoding="utf-8")
    assert "export class DreamSocket" in response.text
    assert "export default DreamSocket" in response.text


@pytest.mark.anyio
async def test_demo_token_is_accepted_by_the_websocket(fast_worker: None) -> None:
    async with running_demo() as client:
        token = await demo_token(client)
        claims = jwt.decode(token, demo.DEMO_SECRET, algorithms=["HS256"])
        assert claims["sub"] == "demo"
        assert 3500 < claims["exp"] - time.time() <= 3600

        async with connect(client, 2, token) as ws:
            assert ws.subprotocol == SUBPROTOCOL  # the token is never echoed
            greeting = await ws.receive_json(timeout=TIMEOUT)
            assert isinstance(greeting.pop("epoch"), str) and isinstance(greeting.pop("seq"), int)
            assert greeting == {
                "type": "connection_established",
                "dream_id": 2,
                "heartbeat_interval": demo.dream_ws.settings.heartbeat_interval,
            }

        # A token signed with another secret is refused: the check above means something.
        forged = jwt.encode({"sub": "demo", "exp": int(time.time()) + 60}, "another-secret-" * 3, algorithm="HS256")
        async with connect(client, 2, forged) as ws:
            error = await ws.receive_json(timeout=TIMEOUT)
            assert error["type"] == "error" and error["code"] == "unauthenticated"
            with pytest.raises(WebSocketDisconnect) as closed:
                await ws.receive_json(timeout=TIMEOUT)
            assert closed.value.code == 4401


# What each dream goes through in one round of the simulated worker.
EXPECTED = {
    1: ["processing", "completed"],
    2: ["processing", "failed"],
    3: ["completed", "delete_processing", "delete_completed"],
}


@pytest.mark.anyio
async def test_worker_updates_reach_websocket_clients(fast_worker: None) -> None:
    async with running_demo() as client:
        token = await demo_token(client)
        async with (
            connect(client, 1, token) as ws1,
            connect(client, 2, token) as ws2,
            connect(client, 3, token) as ws3,
        ):
            last_update: dict[str, Any] = {}
            for dream_id, ws in ((1, ws1), (2, ws2), (3, ws3)):
                assert (await ws.receive_json(timeout=TIMEOUT))["type"] == "connection_established"
                # The worker loops, so each dream's walk comes round again: wait for it in order.
                expected = EXPECTED[dream_id]
                seen = 0
                deadline = time.monotonic() + TIMEOUT
                while seen < len(expected):
                    message = await ws.receive_json(timeout=max(0.0, deadline - time.monotonic()))
                    if message["type"] != "image_update":
                        continue
                    assert message["dream_id"] == dream_id
                    if message["status"] == expected[seen]:
                        seen += 1
                        last_update = message
                    elif message["status"] == expected[0]:
                        seen = 1
                    else:
                        seen = 0
                assert isinstance(last_update["timestamp"], float)

            # The last update of dream 3 deletes its images; a completed dream 1 has three.
            assert last_update["images"] == []
            completed = await ws1.receive_json(timeout=TIMEOUT)
            while not (completed["type"] == "image_update" and completed["status"] == "completed"):
                completed = await ws1.receive_json(timeout=TIMEOUT)
            assert len(completed["images"]) == 3

        # The image URLs the worker publishes are served by the demo itself.
        response = await client.get(completed["images"][0])
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("image/svg+xml")
        assert response.text.startswith("<svg")
        assert (await client.get("/images/not-a-dream.svg")).status_code == 404


@pytest.mark.anyio
async def test_worker_is_cancelled_on_shutdown(fast_worker: None) -> None:
    async with running_demo():
        assert any(task.get_name() == "demo worker" for task in asyncio.all_tasks())
    assert not any(task.get_name() == "demo worker" for task in asyncio.all_tasks())


# -- the client, with node -----------------------------------------------------------------

needs_node = pytest.mark.skipif(NODE is None, reason="node is not installed")


def node_has_websocket() -> bool:
    if NODE is None:
        return False
    probe = subprocess.run(
        [NODE, "--experimental-websocket", "-e", "process.exit(typeof WebSocket === 'function' ? 0 : 1)"],
        capture_output=True,
        timeout=30,
    )
    return probe.returncode == 0


@needs_node
def test_client_script_is_valid_javascript() -> None:
    assert NODE is not None
    result = subprocess.run([NODE, "--check", str(CLIENT)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


# Drives DreamSocket against a fake WebSocket: every rule of the client, fast and exact.
UNIT_SCRIPT = r"""
import assert from 'node:assert/strict';
import { pathToFileURL } from 'node:url';

const { DreamSocket, default: Default } = await import(pathToFileURL(process.argv[2]).href);
assert.equal(Default, DreamSocket);

class FakeWebSocket {
  static all = [];
  constructor(url, protocols) {
    Object.assign(this, { url, protocols, readyState: 0, sent: [], closed: null });
    FakeWebSocket.all.push(this);
  }
  send(text) { this.sent.push(JSON.parse(text)); }
  close(code, reason) { this.closed = { code, reason }; this.readyState = 3; }
  // what the server does
  greet(interval = 30) {
    this.readyState = 1;
    this.onopen?.({});
    this.push({ type: 'connection_established', dream_id: 7, heartbeat_interval: interval });
  }
  push(message) { this.onmessage({ data: JSON.stringify(message) }); }
  drop(code, reason = '') { this.readyState = 3; this.onclose({ code, reason }); }
}

const pause = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
async function until(check, what) {
  for (const end = Date.now() + 3000; !check(); await pause(2)) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
  }
}
const sockets = (n) => until(() => FakeWebSocket.all.length === n, `${n} socket(s)`);

function client(options) {
  FakeWebSocket.all = [];
  const socket = new DreamSocket({ url: 'ws://test/ws/', dreamId: 7, WebSocket: FakeWebSocket, ...options });
  const states = [];
  const errors = [];
  socket.on('state', (change) => states.push(change));
  socket.on('error', (error) => errors.push(error));
  return { socket, states, errors, names: () => states.map((change) => change.state) };
}

const scenarios = {
  async 'token in the subprotocol list; re-sync, pong, status_unknown, close'() {
    const { socket, names, errors } = client({ token: 'aaa.bbb.ccc' });
    await sockets(1);
    const ws = FakeWebSocket.all[0];
    assert.equal(ws.url, 'ws://test/ws/dreams/7');
    assert.deepEqual(ws.protocols, ['dream-ws.v1', 'dream-ws.bearer.aaa.bbb.ccc']);
    assert.deepEqual(names(), ['connecting']);
    const seen = [];
    socket.on('connection_established', (m) => seen.push(m.type));
    socket.on('message', (m) => seen.push(`message:${m.type}`));
    ws.greet();
    assert.equal(socket.state, 'open');
    assert.deepEqual(seen, ['message:connection_established', 'connection_established']);
    assert.deepEqual(ws.sent, [{ type: 'request_status' }]);
    ws.push({ type: 'error', code: 'status_unknown', message: 'no update yet' });
    assert.deepEqual(errors, []);
    ws.push({ type: 'ping', timestamp: 123.5 });
    assert.deepEqual(ws.sent.at(-1), { type: 'pong', timestamp: 123.5 });
    const update = {
      type: 'image_update', dream_id: 7, status: 'completed', images: ['a.svg'], timestamp: 1, message: null,
    };
    const off = socket.on('image_update', () => { throw new Error('a broken listener'); });
    ws.push(update);  // reported, not thrown: the client goes on
    off();
    assert.deepEqual(socket.lastUpdate, update);
    ws.push({ type: 'error', code: 'invalid_message', message: 'bad' });
    assert.equal(errors.length, 1);
    socket.close();
    assert.deepEqual(ws.closed, { code: 1000, reason: 'client closed' });
    assert.deepEqual(names(), ['connecting', 'open', 'closed']);
    await pause(30);
    assert.equal(FakeWebSocket.all.length, 1);
  },

  async 'heartbeat: pings every interval, a silent server is dropped and reconnected'() {
    const { socket, states } = client({ token: 't', backoffBase: 5, backoffMax: 5 });
    await sockets(1);
    const ws = FakeWebSocket.all[0];
    ws.greet(0.03);
    await until(() => ws.sent.some((m) => m.type === 'ping'), 'a client ping');
    assert.equal(typeof ws.sent.find((m) => m.type === 'ping').timestamp, 'number');
    await until(() => ws.closed, 'the watchdog');
    assert.equal(ws.closed.code, 4408);
    assert.equal(states.at(-1).state, 'reconnecting');
    assert.equal(states.at(-1).code, 4408);
    await sockets(2);
    socket.close();
  },

  async 'backoff: doubling, capped, full jitter, reset when stable; getToken each time'() {
    const random = Math.random;
    Math.random = () => 0.999;
    try {
      let calls = 0;
      const { socket, states } = client({
        getToken: async () => `token-${++calls}`, backoffBase: 10, backoffMax: 40, stableAfter: 40,
      });
      for (let n = 1; n <= 4; n++) {
        await sockets(n);
        FakeWebSocket.all[n - 1].drop(1006);
      }
      await sockets(5);
      const ws = FakeWebSocket.all[4];
      assert.deepEqual(ws.protocols, ['dream-ws.v1', 'dream-ws.bearer.token-5']);
      ws.greet();
      await pause(60);
      ws.drop(1001);
      await sockets(6);
      const delays = states.filter((c) => c.state === 'reconnecting').map((c) => c.delay);
      assert.deepEqual(delays, [10, 20, 40, 40, 10]);
      assert.equal(calls, 6);
      Math.random = () => 0;
      FakeWebSocket.all[5].drop(1006);
      assert.equal(states.at(-1).delay, 0);
      socket.close();
    } finally {
      Math.random = random;
    }
  },

  async 'forbidden (4403): auth_failed, never retried'() {
    const { names, states } = client({ getToken: async () => 't' });
    await sockets(1);
    const ws = FakeWebSocket.all[0];
    ws.greet();
    ws.push({ type: 'error', code: 'forbidden', message: 'you may not watch this' });
    ws.drop(4403);
    assert.deepEqual(names(), ['connecting', 'open', 'auth_failed']);
    assert.equal(states.at(-1).code, 4403);
    assert.equal(states.at(-1).error.code, 'forbidden');
    await pause(30);
    assert.equal(FakeWebSocket.all.length, 1);
  },

  async 'unauthenticated (4401): given up without getToken'() {
    const { names } = client({ token: 'expired' });
    await sockets(1);
    FakeWebSocket.all[0].drop(4401);
    assert.deepEqual(names(), ['connecting', 'auth_failed']);
    await pause(30);
    assert.equal(FakeWebSocket.all.length, 1);
  },

  async 'unauthenticated (4401): one retry with a fresh token, again after a good connection'() {
    let calls = 0;
    const { names, states } = client({ getToken: () => `t${++calls}` });
    await sockets(1);
    FakeWebSocket.all[0].drop(4401);
    assert.equal(states.at(-1).delay, 0);
    await sockets(2);
    FakeWebSocket.all[1].greet();  // the fresh token worked...
    FakeWebSocket.all[1].drop(4401);  // ...and expired later: worth one more try
    await sockets(3);
    FakeWebSocket.all[2].push({ type: 'error', code: 'unauthenticated', message: 'the token has expired' });
    FakeWebSocket.all[2].drop(4401);
    assert.deepEqual(names(), ['connecting', 'reconnecting', 'open', 'reconnecting', 'auth_failed']);
    assert.equal(states.at(-1).error.message, 'the token has expired');
    assert.equal(calls, 3);
    await pause(30);
    assert.equal(FakeWebSocket.all.length, 3);
  },

  async 'a failing getToken is an error event and a retry'() {
    let calls = 0;
    const { socket, errors, names } = client({
      getToken: async () => { if (++calls === 1) throw new Error('offline'); return 't'; },
      backoffBase: 5,
    });
    await sockets(1);
    assert.equal(errors[0].code, 'token_unavailable');
    assert.deepEqual(names(), ['connecting', 'reconnecting']);
    socket.close();
  },

  async 'pagehide closes with 1000 and stops; a page back from the cache reconnects'() {
    const page = new EventTarget();
    globalThis.addEventListener = page.addEventListener.bind(page);
    globalThis.removeEventListener = page.removeEventListener.bind(page);
    try {
      const { socket, names } = client({ token: 't' });
      await sockets(1);
      FakeWebSocket.all[0].greet();
      page.dispatchEvent(new Event('pagehide'));
      assert.deepEqual(FakeWebSocket.all[0].closed, { code: 1000, reason: 'client closed' });
      assert.equal(socket.state, 'closed');
      await pause(30);
      assert.equal(FakeWebSocket.all.length, 1);
      page.dispatchEvent(Object.assign(new Event('pageshow'), { persisted: true }));
      await sockets(2);
      assert.deepEqual(names(), ['connecting', 'open', 'closed', 'connecting']);
      socket.close();
      page.dispatchEvent(Object.assign(new Event('pageshow'), { persisted: true }));
      await pause(30);
      assert.equal(FakeWebSocket.all.length, 2);
    } finally {
      delete globalThis.addEventListener;
      delete globalThis.removeEventListener;
    }
  },
};

console.error = () => {};  // the broken listener's report
for (const [name, run] of Object.entries(scenarios)) {
  await run();
  process.stdout.write(`ok - ${name}\n`);
}
"""


@needs_node
def test_client_behaviour(tmp_path: Path) -> None:
    assert NODE is not None
    script = tmp_path / "unit.mjs"
    script.write_text(UNIT_SCRIPT, encoding="utf-8")
    result = subprocess.run([NODE, str(script), str(CLIENT)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("ok - ") == 8, result.stdout


# -- the client against `python examples/demo.py` -------------------------------------------

# Prints the client's events as JSON lines; closes the client when its stdin ends.
E2E_SCRIPT = r"""
import { pathToFileURL } from 'node:url';
const { DreamSocket } = await import(pathToFileURL(process.argv[2]).href);
const [base, mode] = process.argv.slice(3);
const print = (event) => process.stdout.write(JSON.stringify(event) + '\n');
const getToken = async () => (await (await fetch(`${base}/demo-token`)).json()).token;
const socket = new DreamSocket({
  url: base.replace(/^http/, 'ws') + '/ws',
  dreamId: 1,
  backoffBase: 100,
  backoffMax: 1000,
  ...(mode === 'bad-token' ? { token: 'not-a-jwt' } : { getToken }),
});
print({ url: socket.url });
socket.on('state', (change) => print({ state: change }));
socket.on('message', (message) => print({ message }));
process.stdin.on('data', () => {});
process.stdin.on('end', () => { socket.close(); setTimeout(() => process.exit(0), 50); });
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def demo_server(port: int) -> Iterator[str]:
    """`python examples/demo.py` on `port`, with a fast worker."""
    env = {**os.environ, "PORT": str(port), "DEMO_STEP_DELAY": "0.2"}
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "examples" / "demo.py")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert process.stdout is not None
        base = f"http://127.0.0.1:{port}"
        assert process.stdout.readline().strip() == f"Dream images demo: {base}/"
        deadline = time.monotonic() + 20
        while True:  # the URL is printed before uvicorn listens
            try:
                if httpx.get(f"{base}/ws/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise
            time.sleep(0.05)
        yield base
    finally:
        process.terminate()
        process.wait(timeout=20)


class NodeClient:
    """The e2e script in node, its output read line by line."""

    def __init__(self, script: Path, base: str, mode: str) -> None:
        assert NODE is not None
        self.process = subprocess.Popen(
            [NODE, "--experimental-websocket", "--no-warnings", str(script), str(CLIENT), base, mode],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line)

    def next(self, timeout: float = 10) -> dict[str, Any]:
        try:
            value = json.loads(self.lines.get(timeout=timeout))
        except queue.Empty:
            raise AssertionError("the client said nothing in time") from None
        assert isinstance(value, dict)
        return value

    def wait_for(self, wanted: Any, timeout: float = 10) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            event = self.next(max(0.01, deadline - time.monotonic()))
            if wanted(event):
                return event

    def stop(self) -> list[dict[str, Any]]:
        """Close the client (stdin ends) and return what it said until it exited."""
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(timeout=10)
        rest = []
        with contextlib.suppress(queue.Empty):
            while True:
                rest.append(json.loads(self.lines.get(timeout=1)))
        return rest


def state_is(name: str) -> Any:
    return lambda event: event.get("state", {}).get("state") == name


def update_is(status: str) -> Any:
    return lambda event: event.get("message", {}).get("type") == "image_update" and event["message"]["status"] == status


@pytest.mark.integration
@pytest.mark.skipif(not node_has_websocket(), reason="node has no WebSocket")
def test_client_against_the_demo_server(tmp_path: Path) -> None:
    script = tmp_path / "e2e.mjs"
    script.write_text(E2E_SCRIPT, encoding="utf-8")
    port = free_port()
    client = None
    try:
        with demo_server(port) as base:
            # A bad token: refused with 4401 and the server's reason, never retried.
            refused = NodeClient(script, base, "bad-token")
            try:
                assert refused.next() == {"url": f"ws://127.0.0.1:{port}/ws/dreams/1"}  # no token in it
                failed = refused.wait_for(state_is("auth_failed"))["state"]
                assert failed["code"] == 4401
                assert failed["error"]["code"] == "unauthenticated"
            finally:
                rest = refused.stop()
            assert [event["state"]["state"] for event in rest if "state" in event] == ["closed"]

            client = NodeClient(script, base, "fetch")
            client.wait_for(state_is("open"))
            client.wait_for(update_is("processing"))
            client.wait_for(update_is("completed"))

        # The server has stopped under the client, which waits and tries again...
        lost = client.wait_for(state_is("reconnecting"))["state"]
        assert lost["code"] not in (4401, 4403)
        with demo_server(port):
            # ...until the server is back, then re-syncs (request_status) and gets updates again.
            client.wait_for(state_is("open"), timeout=20)
            client.wait_for(lambda event: event.get("message", {}).get("type") == "image_update")
    finally:
        if client is not None:
            client.stop()
