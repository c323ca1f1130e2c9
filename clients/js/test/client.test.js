// DreamSocket against fakes of the page, WebSocket and EventSource, on mocked timers: time only
// passes when a test ticks it, and events happen when a test fires them.
import assert from 'node:assert/strict';
import { afterEach, beforeEach, describe, it, mock } from 'node:test';

import DefaultExport, { DreamSocket } from '../src/dream-ws.js';
import { FakePage, fakeEventSource, fakeWebSocket, jwt, settle } from './fakes.js';

const NOW = Date.UTC(2026, 0, 1);
const BASE = 'wss://app.example/ws';

beforeEach(() => mock.timers.enable({ apis: ['setTimeout', 'setInterval', 'Date'], now: NOW }));
afterEach(() => mock.timers.reset());

/**
 * A client on fakes, connected (after `settle()`) unless `autoConnect: false`, and what it said.
 * @param {Record<string, any>} [options]
 */
function start(options = {}) {
  const WebSocket = fakeWebSocket();
  const EventSource = fakeEventSource();
  const page = new FakePage();
  const socket = new DreamSocket({ dreamId: 7, url: BASE, token: 'a.b.c', WebSocket, EventSource, window: page, ...options });
  /** @type {any[]} */ const states = [];
  /** @type {any[]} */ const updates = [];
  /** @type {any[]} */ const errors = [];
  socket.on('state', (change) => states.push(change));
  socket.on('image_update', (update) => updates.push(update));
  socket.on('error', (error) => errors.push(error));
  return {
    socket,
    page,
    WebSocket,
    EventSource,
    states,
    updates,
    errors,
    /** The latest WebSocket the client made. */
    ws: () => WebSocket.all.at(-1),
    /** The latest `state` change. */
    state: () => states.at(-1),
  };
}

/** @param {number} seq */
function update(seq, epoch = 'e1', status = 'processing') {
  return { type: 'image_update', dream_id: 7, status, images: [], timestamp: seq, message: null, seq, epoch };
}

describe('in Node, without a page', () => {
  it('imports and connects with no window, document or navigator around', async () => {
    assert.equal(typeof globalThis.window, 'undefined');
    assert.equal(typeof globalThis.document, 'undefined');
    assert.equal(DefaultExport, DreamSocket);
    const WebSocket = fakeWebSocket();
    const socket = new DreamSocket({ dreamId: 1, url: 'ws://localhost/ws', token: 'a.b.c', WebSocket });
    await settle();
    assert.equal(WebSocket.all.length, 1);
    WebSocket.all[0].greet();
    assert.equal(socket.state, 'open');
    WebSocket.all[0].drop(1006);
    assert.equal(socket.state, 'reconnecting');
    socket.close();
    assert.equal(socket.state, 'closed');
  });

  it('asks for `url` when there is no page to take it from', () => {
    assert.throws(() => new DreamSocket({ dreamId: 1, token: 't', autoConnect: false }), /options\.url is required/);
  });

  it("defaults `url` to /ws on the page's host", () => {
    const socket = new DreamSocket({ dreamId: 'a/b', token: 't', autoConnect: false, window: new FakePage() });
    assert.equal(socket.url, 'wss://app.example/ws/dreams/a%2Fb');
  });
});

describe('connecting', () => {
  it('sends the token as a subprotocol and asks for the status on a first connect', async () => {
    const { ws, socket, states } = start();
    await settle();
    assert.equal(ws().url, `${BASE}/dreams/7`);
    assert.deepEqual(ws().protocols, ['dream-ws.v1', 'dream-ws.bearer.a.b.c']);
    ws().greet();
    assert.deepEqual(ws().sent, [{ type: 'request_status' }]);
    assert.deepEqual(
      states.map((change) => change.state),
      ['connecting', 'open'],
    );
    assert.equal(socket.transport, 'websocket');
    socket.close();
    assert.deepEqual(ws().closed, { code: 1000, reason: 'client closed' });
  });

  it('does not connect when closed before its first connect ran (a component unmounted at once)', async () => {
    const { socket, WebSocket, states } = start();
    socket.close();
    await settle();
    assert.equal(WebSocket.all.length, 0);
    assert.deepEqual(states, []);
    socket.connect(); // and it can still be started by hand
    assert.equal(WebSocket.all.length, 1);
    socket.close();
  });
});

describe('reconnecting', () => {
  it('backs off exponentially up to backoffMax, with full jitter, and starts over once stable', (t) => {
    let random = 0.5;
    t.mock.method(Math, 'random', () => random);
    const { socket, WebSocket, ws, states } = start({
      autoConnect: false,
      transport: 'websocket', // five failures in a row would switch `auto` to SSE
      backoffBase: 400,
      backoffMax: 2000,
      stableAfter: 5000,
    });
    socket.connect();
    const delays = [];
    for (let attempt = 1; attempt <= 5; attempt++) {
      ws().drop(1006);
      const { delay } = states.at(-1);
      delays.push(delay);
      mock.timers.tick(delay - 1);
      assert.equal(WebSocket.all.length, attempt, 'not before the delay');
      mock.timers.tick(1);
      assert.equal(WebSocket.all.length, attempt + 1, 'at the delay');
    }
    // Ceilings 400, 800, 1600, 2000, 2000; the delay is drawn in [0, ceiling).
    assert.deepEqual(delays, [200, 400, 800, 1000, 1000]);
    assert.deepEqual(
      states.filter((change) => change.state === 'reconnecting').map((change) => change.attempt),
      [1, 2, 3, 4, 5],
    );

    random = 0.25;
    ws().greet();
    mock.timers.tick(5000);
    ws().drop(1001);
    assert.equal(states.at(-1).delay, 100, 'after a stable connection, the first ceiling again');
    socket.close();
  });

  it('asks getToken() for a fresh token before each reconnect', async (t) => {
    t.mock.method(Math, 'random', () => 0);
    let calls = 0;
    const { socket, ws } = start({ token: undefined, getToken: async () => `t.${++calls}.x` });
    await settle();
    assert.deepEqual(ws().protocols, ['dream-ws.v1', 'dream-ws.bearer.t.1.x']);
    ws().drop(1006);
    mock.timers.tick(0);
    await settle();
    assert.deepEqual(ws().protocols, ['dream-ws.v1', 'dream-ws.bearer.t.2.x']);
    socket.close();
  });

  it('does not retry while the browser is offline, and reconnects at once when it is back', (t) => {
    t.mock.method(Math, 'random', () => 0.999);
    const { socket, page, WebSocket, ws, states } = start({ autoConnect: false, backoffBase: 1000, backoffMax: 8000 });
    socket.connect();
    ws().drop(1006);
    mock.timers.tick(1000);
    ws().drop(1006); // two failures: the next ceiling is 4000
    page.offline();
    mock.timers.tick(2000); // the pending retry comes due while offline: it waits too
    assert.equal(WebSocket.all.length, 2);
    assert.deepEqual(states.at(-1), { state: 'reconnecting', code: 1006, reason: '', offline: true });

    mock.timers.tick(10 * 60 * 1000);
    assert.equal(WebSocket.all.length, 2, 'no attempt while offline, however long');
    page.visibility('hidden');
    page.visibility('visible');
    assert.equal(WebSocket.all.length, 2, 'showing the tab does not try while offline');

    page.online();
    assert.equal(WebSocket.all.length, 3, 'at once, without a delay');
    ws().drop(1006);
    assert.equal(states.at(-1).delay, 999, 'the backoff started over');
    socket.close();
  });

  it('a connection lost while offline waits for `online`', () => {
    const { socket, page, WebSocket, ws, state } = start({ autoConnect: false });
    socket.connect();
    ws().greet();
    page.offline();
    ws().drop(1006);
    assert.equal(state().offline, true);
    assert.equal(state().delay, undefined);
    mock.timers.tick(60_000);
    assert.equal(WebSocket.all.length, 1);
    page.online();
    assert.equal(WebSocket.all.length, 2);
    assert.match(ws().url, /\/dreams\/7$/);
    socket.close();
  });

  it('reconnects at once when the browser comes online while it backs off', (t) => {
    t.mock.method(Math, 'random', () => 0.999);
    const { socket, page, WebSocket, ws } = start({ autoConnect: false, backoffBase: 30_000, backoffMax: 30_000, connectTimeout: 120_000 });
    socket.connect();
    ws().drop(1006);
    page.online(); // e.g. the laptop joined a network: no `offline` was seen before
    assert.equal(WebSocket.all.length, 2);
    mock.timers.tick(60_000);
    assert.equal(WebSocket.all.length, 2, 'the retry that was due is cancelled');
    ws().greet();
    page.online();
    assert.equal(WebSocket.all.length, 2, 'an open connection is left alone');
    socket.close();
  });

  it('reconnects at once when the tab becomes visible while it backs off', (t) => {
    t.mock.method(Math, 'random', () => 0.999);
    const { socket, page, WebSocket, ws } = start({ autoConnect: false, backoffBase: 30_000, backoffMax: 30_000, connectTimeout: 120_000 });
    socket.connect();
    ws().greet();
    page.visibility('hidden');
    page.visibility('visible');
    assert.equal(WebSocket.all.length, 1, 'an open connection is left alone');
    page.visibility('hidden');
    ws().drop(1006);
    page.visibility('hidden');
    assert.equal(WebSocket.all.length, 1, 'hiding does nothing');
    page.visibility('visible');
    assert.equal(WebSocket.all.length, 2);
    page.visibility('visible');
    assert.equal(WebSocket.all.length, 2, 'an attempt under way is not replaced');
    mock.timers.tick(60_000);
    assert.equal(WebSocket.all.length, 2, 'the retry that was due is cancelled');
    socket.close();
  });

  it('forgets the page once closed: `online` and `visibilitychange` start nothing', () => {
    const { socket, page, WebSocket, ws } = start({ autoConnect: false });
    socket.connect();
    ws().drop(1006);
    socket.close();
    page.online();
    page.visibility('visible');
    mock.timers.tick(60_000);
    assert.equal(WebSocket.all.length, 1);
  });

  it('stops after 4403, and after a 4401 that a fresh token did not mend', async () => {
    const forbidden = start();
    await settle();
    forbidden.ws().drop(4403);
    assert.equal(forbidden.state().state, 'auth_failed');

    let calls = 0;
    const expired = start({ token: undefined, getToken: () => `t.${++calls}.x` });
    await settle();
    expired.ws().drop(4401);
    assert.equal(expired.state().delay, 0);
    mock.timers.tick(0);
    await settle();
    expired.ws().drop(4401);
    assert.equal(expired.state().state, 'auth_failed');
    expired.page.online();
    mock.timers.tick(60_000);
    await settle();
    assert.equal(expired.WebSocket.all.length, 2);
    assert.equal(calls, 2);
  });
});

describe('positions', () => {
  it('resumes from the last update applied (`since`), and asks for no status then', (t) => {
    t.mock.method(Math, 'random', () => 0);
    const { socket, ws, states } = start({ autoConnect: false });
    socket.connect();
    ws().greet();
    ws().push(update(1));
    ws().push(update(2));
    assert.deepEqual(socket.position, { epoch: 'e1', seq: 2 });
    ws().drop(1006);
    mock.timers.tick(0);
    assert.equal(ws().url, `${BASE}/dreams/7?since=e1%3A2`);
    ws().greet({ seq: 3, recovered: true });
    assert.deepEqual(ws().sent, [], 'the server sends what was missed by itself');
    assert.equal(socket.recovered, true);
    assert.equal(states.at(-1).recovered, true);
    socket.close();
  });

  it('drops an update that is not newer than the last applied; a new epoch starts over', () => {
    const { socket, ws, updates } = start({ autoConnect: false });
    socket.connect();
    ws().greet();
    ws().push(update(3));
    ws().push(update(2)); // older: a status answer that raced a live update
    ws().push(update(3)); // the same again
    ws().push(update(1, 'e2')); // the history was lost: a new epoch counts from 1
    ws().push(update(2, 'e2', 'completed'));
    assert.deepEqual(
      updates.map((u) => `${u.epoch}:${u.seq}`),
      ['e1:3', 'e2:1', 'e2:2'],
    );
    assert.equal(socket.lastUpdate?.status, 'completed');
    assert.deepEqual(socket.position, { epoch: 'e2', seq: 2 });
    socket.close();
  });
});

describe('token renewal', () => {
  it('renews the token in place before it expires, again after each renewal', async () => {
    const tokens = [jwt(NOW / 1000 + 600), jwt(NOW / 1000 + 1200), jwt(NOW / 1000 + 1800)];
    let calls = 0;
    const { socket, ws, errors } = start({ token: undefined, getToken: async () => tokens[calls++] });
    await settle();
    assert.equal(calls, 1);
    ws().greet({ heartbeat_interval: 3600 }); // no pings or watchdog in the way
    ws().sent.length = 0;

    // 600 s left: renewed refreshMargin (60 s) before the expiry.
    mock.timers.tick(540_000 - 1);
    await settle();
    assert.deepEqual(ws().sent, []);
    mock.timers.tick(1);
    await settle();
    assert.deepEqual(ws().sent, [{ type: 'refresh_token', token: tokens[1] }]);

    ws().push({ type: 'token_refreshed', expires_at: NOW / 1000 + 1200 });
    mock.timers.tick(600_000); // at 1140 s: 60 s before the second expiry
    await settle();
    assert.deepEqual(ws().sent.at(-1), { type: 'refresh_token', token: tokens[2] });
    assert.equal(calls, 3);
    assert.deepEqual(errors, []);
    assert.equal(socket.state, 'open');
    socket.close();
  });

  it('reports a failing getToken() and retries the renewal before the expiry', async () => {
    let fail = true;
    const { socket, ws, errors } = start({
      token: jwt(NOW / 1000 + 600),
      getToken: async () => {
        if (fail) throw new Error('token endpoint down');
        return jwt(NOW / 1000 + 1200);
      },
      backoffBase: 1000,
    });
    await settle();
    ws().greet({ heartbeat_interval: 3600 });
    mock.timers.tick(540_000);
    await settle();
    assert.deepEqual(
      errors.map((error) => error.code),
      ['token_unavailable'],
    );
    fail = false;
    mock.timers.tick(1000);
    await settle();
    assert.equal(ws().sent.at(-1).type, 'refresh_token');
    socket.close();
  });
});

describe('Server-Sent Events', () => {
  it('falls back to SSE after sseAfter WebSocket failures that never opened', (t) => {
    t.mock.method(Math, 'random', () => 0);
    const { socket, WebSocket, EventSource, ws, states, updates } = start({ autoConnect: false, sseAfter: 2 });
    socket.connect();
    ws().drop(1006);
    mock.timers.tick(0);
    assert.equal(EventSource.all.length, 0, 'one failure is not enough');
    ws().drop(1006);
    mock.timers.tick(0);
    assert.equal(WebSocket.all.length, 2);
    assert.equal(EventSource.all.length, 1);
    const es = EventSource.all[0];
    assert.equal(es.url, 'https://app.example/ws/dreams/7/events?token=a.b.c');
    es.emit({ type: 'connection_established', dream_id: 7, heartbeat_interval: 30, epoch: 'e1', seq: 4 });
    assert.deepEqual(states.at(-1), { state: 'open', recovered: null, transport: 'sse' });
    es.emit(update(4));
    assert.deepEqual(
      updates.map((u) => u.seq),
      [4],
    );
    socket.close();
    assert.equal(es.readyState, 2);
  });

  it('counts no WebSocket failure that happened offline toward the fallback', (t) => {
    t.mock.method(Math, 'random', () => 0);
    const { socket, page, EventSource, ws } = start({ autoConnect: false, sseAfter: 2 });
    socket.connect();
    page.offline();
    ws().drop(1006);
    page.online();
    ws().drop(1006);
    mock.timers.tick(0);
    assert.equal(EventSource.all.length, 0);
    assert.equal(socket.transport, 'websocket');
    socket.close();
  });

  it('asks why a stream was refused: 403 stops with auth_failed, as a WebSocket 4403 would', async () => {
    /** @type {string[]} */ const asked = [];
    const fetch = async (/** @type {string} */ url) => (asked.push(url), { status: 403 });
    const { EventSource, state } = start({ transport: 'sse', fetch });
    await settle();
    EventSource.all[0].refuse();
    await settle();
    assert.deepEqual(asked, [EventSource.all[0].url]);
    assert.equal(state().state, 'auth_failed');
    assert.equal(state().code, 4403);
  });

  it('retries a refused stream that the server accepts when asked (a refusal of the moment)', async () => {
    const { EventSource, state } = start({ transport: 'sse', fetch: async () => ({ status: 200 }) });
    await settle();
    EventSource.all[0].refuse();
    await settle();
    assert.equal(state().state, 'reconnecting');
    assert.equal(state().code, 1006);
  });

  it('retries a failed stream itself: with backoff, a fresh token and `since`', async (t) => {
    t.mock.method(Math, 'random', () => 0.5);
    let calls = 0;
    const { socket, page, EventSource, states, errors } = start({
      transport: 'sse',
      token: undefined,
      getToken: async () => `t.${++calls}.x`,
      backoffBase: 1000,
    });
    await settle();
    const first = EventSource.all[0];
    assert.equal(first.url, 'https://app.example/ws/dreams/7/events?token=t.1.x');
    first.emit({ type: 'connection_established', dream_id: 7, heartbeat_interval: 30, epoch: 'e1', seq: 0 });
    first.emit(update(1));
    first.emit({ type: 'error', code: 'token_expired', message: 'the token has expired' });
    assert.equal(errors.at(-1).code, 'token_expired');
    first.fail(); // the stream ends: EventSource would retry with the old token
    assert.equal(first.readyState, 2, 'closed, so that it does not retry by itself');
    assert.equal(states.at(-1).state, 'reconnecting');
    assert.equal(states.at(-1).delay, 500);
    mock.timers.tick(500);
    await settle();
    assert.equal(EventSource.all[1].url, 'https://app.example/ws/dreams/7/events?token=t.2.x&since=e1%3A1');

    page.offline();
    EventSource.all[1].fail();
    mock.timers.tick(60_000);
    await settle();
    assert.equal(EventSource.all.length, 2, 'no retry while offline');
    page.online();
    await settle();
    assert.equal(EventSource.all.length, 3);
    socket.close();
  });
});
