// Generated from clients/js/src/dream-ws.js by `npm run build` in clients/js: edit that file.
// dream-ws.js: the browser client of starlette_dream_ws (wire protocol v1.1). No dependencies.
//
//   import { DreamSocket } from '/ws/dream-ws.js';    // as served by the app, or
//   import { DreamSocket } from 'dream-ws-client';    // from npm (then pass `url`)
//   const socket = new DreamSocket({ dreamId: 42, getToken: fetchToken });
//   socket.on('image_update', (update) => render(update));
//   socket.on('state', ({ state, recovered }) => showConnection(state, recovered));
//
// With `getToken`, the token of an open connection is also renewed (`refresh_token`) shortly
// before its `exp`, so that the server does not close a long-lived connection with 4401.
//
// The client keeps the position (`epoch`, `seq`) of the last update it applied, resumes from it
// on every reconnect (`since`: the server sends what was missed, or the latest state), and never
// applies an update that is not newer. Where WebSocket cannot connect, it falls back to
// Server-Sent Events with the same events.
//
// Between attempts it waits a jittered, growing delay; it waits for the `online` event instead
// while the browser says it is offline, and stops waiting when the network comes back or the tab
// is shown again. Nothing touches the page at import time: the module loads in Node (tests, SSR).

const SUBPROTOCOL = 'dream-ws.v1';
const TOKEN_PREFIX = 'dream-ws.bearer.';
const UNAUTHENTICATED = 4401;
const FORBIDDEN = 4403;
const HEARTBEAT_TIMEOUT = 4408;
// What a subprotocol may hold (an HTTP token, RFC 9110): a JWT always fits; on anything else
// `new WebSocket` throws.
const SUBPROTOCOL_TOKEN = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$/;
// Less time left than this is not worth a refresh: the server closes, reconnecting mends it.
const MIN_REFRESH_LEAD = 1000;
// A renewal retried closer than this to the expiry could not reach the server in time.
const RETRY_LEAD = 100;
// setTimeout runs a longer delay at once.
const MAX_DELAY = 2 ** 31 - 1;

/** @typedef {'connecting' | 'open' | 'reconnecting' | 'closed' | 'auth_failed'} ConnectionState */

/** Where an update stands in its dream's history. @typedef {{ epoch: string, seq: number }} Position */

/**
 * A server message: always a string `type`, other fields as the protocol says.
 * @typedef {{ type: string, [field: string]: any }} Message
 */

/**
 * The `error` message (`code` is machine-readable).
 * @typedef {{ type: 'error', code: string, message: string }} ErrorMessage
 */

/**
 * What a `state` listener gets. `code`/`reason` are those of the close that caused the change;
 * `attempt` and `delay` (ms) describe a scheduled reconnect; `error` is the server's last
 * `error` message (why authentication failed). On `open`: `transport`, and `recovered` after a
 * reconnect that resumed (true: every missed update follows; false: the latest state follows).
 * `offline`: the reconnect waits for the browser to be online again, with no delay set.
 * @typedef {{ state: ConnectionState, code?: number, reason?: string, attempt?: number,
 *   delay?: number, offline?: boolean, error?: ErrorMessage | null, recovered?: boolean | null,
 *   transport?: 'websocket' | 'sse' }} StateChange
 */

/**
 * What the client uses of the page (`window` in a browser); every part is optional.
 * @typedef {Object} Page
 * @property {(type: string, listener: (event: any) => void) => void} [addEventListener]
 * @property {(type: string, listener: (event: any) => void) => void} [removeEventListener]
 * @property {{ visibilityState?: string, addEventListener?: Page['addEventListener'],
 *   removeEventListener?: Page['removeEventListener'] }} [document]
 * @property {{ onLine?: boolean }} [navigator]
 * @property {{ protocol: string, host: string }} [location]
 * @property {typeof WebSocket} [WebSocket]
 * @property {typeof EventSource} [EventSource]
 * @property {typeof fetch} [fetch]
 */

/**
 * @typedef {Object} DreamSocketOptions
 * @property {number | string} dreamId The dream to watch.
 * @property {string} [url] WebSocket base where the app is mounted, e.g. `wss://example.com/ws`.
 *   Default: the folder this module was served from (`/ws/dream-ws.js` -> `/ws`), else `/ws` on
 *   the page's host (always pass it when the module comes from npm through a bundler).
 * @property {string} [token] A JWT. Sent in the subprotocol list, never in the URL.
 * @property {() => string | Promise<string>} [getToken] Returns a (fresh) JWT; called before each
 *   reconnect, and allows one retry after a 4401 close. Also called before the connection's token
 *   expires, to renew it in place. Surrounding whitespace is ignored.
 * @property {number} [refreshMargin=60000] ms before the token's `exp` to renew it (with
 *   `getToken`), at most a quarter of the token's remaining lifetime.
 * @property {number} [heartbeatInterval=30000] ms between pings until the server announces its own.
 * @property {number} [connectTimeout=10000] ms a handshake may take before the attempt is dropped.
 * @property {number} [backoffBase=500] ms, the first reconnect delay ceiling.
 * @property {number} [backoffMax=15000] ms, the largest reconnect delay.
 * @property {number} [stableAfter=10000] ms a connection must last for the backoff to start over.
 * @property {boolean} [autoConnect=true] Connect right away (after the current task, so that
 *   listeners added just after `new` see every event).
 * @property {'auto' | 'websocket' | 'sse'} [transport='auto'] `auto`: WebSocket, and Server-Sent
 *   Events once WebSocket has failed `sseAfter` times in a row without ever opening.
 * @property {number} [sseAfter=3] WebSocket failures in a row before `auto` falls back to SSE.
 * @property {typeof WebSocket} [WebSocket] WebSocket implementation (tests, non-browser hosts).
 *   Default: the page's.
 * @property {typeof EventSource} [EventSource] EventSource implementation. Default: the page's.
 * @property {typeof fetch} [fetch] Asks why an event stream was refused. Default: the page's.
 * @property {Page} [window] The page: where `online`, `pagehide` and `pageshow` are heard,
 *   `document` (visibility) and `navigator` (onLine) are read. Default: `globalThis`.
 */

/**
 * @param {Page} page
 * @returns {string}
 */
function defaultBaseUrl(page) {
  // The app serves this file at `<mount>/dream-ws.js`, so its folder is the mount point. A copy
  // that a dev server hands out from node_modules says nothing about where the app is mounted.
  let here = null;
  try {
    here = new URL(import.meta.url);
  } catch {
    // A bundle for CommonJS leaves import.meta empty.
  }
  if (here && /^https?:$/.test(here.protocol) && here.pathname.endsWith('/dream-ws.js') && !here.pathname.includes('/node_modules/')) {
    const scheme = here.protocol === 'https:' ? 'wss:' : 'ws:';
    return `${scheme}//${here.host}${here.pathname.slice(0, -'/dream-ws.js'.length)}`;
  }
  const location = page.location;
  if (!location) throw new TypeError('DreamSocket: options.url is required outside a page');
  return `${location.protocol === 'https:' ? 'wss:' : 'ws:'}//${location.host}/ws`;
}

/**
 * When a JWT expires, from its `exp` claim (the token is not verified: only the server can).
 * @param {unknown} token
 * @returns {number | null} ms since the epoch; null for a token that is not a JWT or has no `exp`
 */
function expiryOf(token) {
  const parts = typeof token === 'string' ? token.split('.') : [];
  if (parts.length !== 3) return null;
  try {
    // base64url to base64; atob() does without the padding.
    const exp = JSON.parse(atob(parts[1].replace(/-/g, '+').replace(/_/g, '/'))).exp;
    return typeof exp === 'number' && Number.isFinite(exp) ? exp * 1000 : null;
  } catch {
    return null;
  }
}

/** @param {unknown} error */
function tokenUnavailable(error) {
  return { type: 'error', code: 'token_unavailable', message: String(/** @type {any} */ (error)?.message ?? error) };
}

/** @param {unknown} error */
function report(error) {
  // A failing listener must not break the connection, nor go unnoticed.
  const reportError = /** @type {any} */ (globalThis).reportError;
  if (typeof reportError === 'function') reportError(error);
  else console.error(error);
}

/** Live updates of one dream, over one WebSocket that keeps itself connected. */
export class DreamSocket {
  /** @param {DreamSocketOptions} options */
  constructor(options) {
    if (options?.dreamId == null) throw new TypeError('DreamSocket: dreamId is required');
    if (!options.token && !options.getToken) throw new TypeError('DreamSocket: token or getToken is required');
    this.options = {
      heartbeatInterval: 30000,
      connectTimeout: 10000,
      backoffBase: 500,
      backoffMax: 15000,
      stableAfter: 10000,
      refreshMargin: 60000,
      transport: 'auto',
      sseAfter: 3,
      ...options,
    };
    /** @type {Page} */
    this._page = options.window ?? globalThis;
    /** @readonly */
    this.dreamId = options.dreamId;
    /** @readonly */
    this.url = `${(options.url ?? defaultBaseUrl(this._page)).replace(/\/+$/, '')}/dreams/${encodeURIComponent(String(options.dreamId))}`;
    /** @type {ConnectionState} */
    this.state = 'closed';
    /** @type {Message | null} The latest `image_update`. */
    this.lastUpdate = null;
    /** @type {ErrorMessage | null} The latest `error` from the server (status_unknown excepted). */
    this.lastError = null;
    /** @type {Position | null} The position of the last update applied: resumed from on reconnect. */
    this.position = null;
    /** @type {boolean | null} Whether the last connect resumed every missed update (null: no resume). */
    this.recovered = null;
    /** @type {'websocket' | 'sse'} */
    this.transport = this.options.transport === 'sse' ? 'sse' : 'websocket';

    /** @type {Map<string, Set<(event: any) => void>>} */
    this._listeners = new Map();
    /** @type {WebSocket | null} */
    this._ws = null;
    /** @type {EventSource | null} */
    this._es = null;
    this._neverOpened = 0; // WebSocket attempts in a row that closed before opening
    this._run = 0; // bumped by close(): a connect still awaiting getToken() then gives up
    this._stopped = true;
    this._attempt = 0; // failed connections in a row: the backoff exponent
    this._authRetried = false;
    this._openedAt = 0;
    this._interval = 0; // the server's heartbeat interval in ms, once known
    /** @type {number | null} */ this._expiresAt = null; // of the token the socket connected with
    /** @type {any} */ this._retryTimer = null;
    // Between two attempts: a retry timer, or the `online` event, starts the next one.
    this._waiting = false;
    /** @type {any} */ this._pingTimer = null;
    /** @type {any} */ this._watchdog = null;
    /** @type {any} */ this._refreshTimer = null;
    this._resumeOnShow = false;

    // Closing on pagehide says goodbye cleanly and lets the page into the back/forward cache
    // (an open WebSocket keeps it out); a page restored from that cache connects again.
    this._onPageHide = () => {
      if (this._stopped) return;
      this._resumeOnShow = true;
      this._stop();
    };
    /** @param {any} event */
    this._onPageShow = (event) => {
      if (event.persisted && this._resumeOnShow) this.connect();
    };
    // Back online: the failures so far were the network's, so the backoff starts over.
    this._onOnline = () => this._wake(true);
    // A tab shown again is when its user looks at it: reconnect now rather than after the delay.
    this._onVisibilityChange = () => {
      if (this._page.document?.visibilityState === 'visible' && !this._offline()) this._wake(false);
    };

    // A close() before the microtask runs (a component unmounted at once) cancels the connect.
    const run = this._run;
    if (options.autoConnect !== false) queueMicrotask(() => run === this._run && this.connect());
  }

  /**
   * Listen to `state`, `message` (every server message), or one message type:
   * `connection_established`, `image_update`, `error`, `pong`, ... Returns a function that
   * removes the listener.
   * @param {string} type
   * @param {(event: any) => void} callback
   * @returns {() => void}
   */
  on(type, callback) {
    let callbacks = this._listeners.get(type);
    if (!callbacks) this._listeners.set(type, (callbacks = new Set()));
    callbacks.add(callback);
    return () => this.off(type, callback);
  }

  /**
   * @param {string} type
   * @param {(event: any) => void} callback
   */
  off(type, callback) {
    this._listeners.get(type)?.delete(callback);
  }

  /** Start connecting (done by the constructor unless `autoConnect: false`); idempotent. */
  connect() {
    if (!this._stopped) return;
    this._stopped = false;
    this._resumeOnShow = false;
    this._listen('addEventListener');
    this._attempt = 0;
    this._authRetried = false;
    this._open('connecting');
  }

  /** Close with 1000 and stop reconnecting. `connect()` starts again. */
  close() {
    this._resumeOnShow = false;
    this._listen('removeEventListener');
    this._stop();
  }

  /**
   * Send one message; false when not connected (nothing is queued: state is re-synced on connect).
   * @param {Message} message
   * @returns {boolean}
   */
  send(message) {
    const ws = this._ws;
    if (!ws || ws.readyState !== 1) return false;
    ws.send(JSON.stringify(message));
    return true;
  }

  /** Ask for the dream's latest state (answered by an `image_update`); done on every connect. */
  requestStatus() {
    return this.send({ type: 'request_status' });
  }

  // -- internals ---------------------------------------------------------------------------

  /**
   * Add or remove the page listeners; each is a no-op where the page lacks it (Node, SSR).
   * @param {'addEventListener' | 'removeEventListener'} method
   */
  _listen(method) {
    const page = this._page;
    page[method]?.('pagehide', this._onPageHide);
    page[method]?.('pageshow', this._onPageShow);
    page[method]?.('online', this._onOnline);
    page.document?.[method]?.('visibilitychange', this._onVisibilityChange);
  }

  /** Whether the browser knows it has no network (`onLine` true only means "maybe"). */
  _offline() {
    return this._page.navigator?.onLine === false;
  }

  /**
   * @param {'WebSocket' | 'EventSource' | 'fetch'} name
   * @returns {any} the implementation given in the options, else the page's
   */
  _impl(name) {
    return this.options[name] ?? this._page[name];
  }

  /**
   * Start the next attempt now, if the client is waiting between two.
   * @param {boolean} fresh start the backoff over
   */
  _wake(fresh) {
    if (!this._waiting) return;
    if (fresh) this._attempt = 0;
    clearTimeout(this._retryTimer);
    this._open('reconnecting');
  }

  /** @param {ConnectionState} state */
  async _open(state) {
    const run = this._run;
    this._waiting = false;
    this._retryTimer = null;
    if (state === 'connecting') this._setState({ state });
    let token = this.options.token;
    if (this.options.getToken && (state !== 'connecting' || !token)) {
      try {
        token = await this.options.getToken();
      } catch (error) {
        if (run !== this._run) return;
        this._emit('error', tokenUnavailable(error));
        if (run === this._run) this._scheduleReconnect({}); // unless a listener called close()
        return;
      }
    }
    if (run !== this._run) return; // closed while waiting for the token
    if (typeof token === 'string') token = token.trim(); // e.g. read with `response.text()`
    if (this.transport === 'sse') {
      this._openEvents(run, token);
      return;
    }
    if (token && !SUBPROTOCOL_TOKEN.test(token)) {
      // Not a JWT, and `new WebSocket` would throw on it: refused as the server refuses a bad token.
      this.lastError = { type: 'error', code: 'invalid_token', message: 'the token has characters a JWT never has' };
      this._emit('error', this.lastError);
      if (run === this._run) this._onClose(UNAUTHENTICATED, 'invalid token');
      return;
    }
    const WS = this._impl('WebSocket');
    /** @type {WebSocket} */
    let ws;
    try {
      // The token travels as a subprotocol, which keeps it out of URLs and access logs; the
      // server selects only `dream-ws.v1`, never echoing the token.
      ws = new WS(this.url + this._since('?'), token ? [SUBPROTOCOL, TOKEN_PREFIX + token] : [SUBPROTOCOL]);
    } catch (error) {
      // The browser refused to even try (a URL it rejects, mixed content): say so, try again later.
      this._emit('error', { type: 'error', code: 'connect_failed', message: String(/** @type {any} */ (error)?.message ?? error) });
      if (run === this._run) this._scheduleReconnect({});
      return;
    }
    this._ws = ws;
    this._expiresAt = expiryOf(token);
    ws.onmessage = (event) => {
      if (this._ws === ws) this._onMessage(event.data);
    };
    ws.onclose = (event) => {
      if (this._ws === ws) this._onClose(event.code, event.reason);
    };
    ws.onerror = () => {}; // a close event always follows, and says more
    this._armWatchdog();
  }

  /**
   * `since=<epoch>:<seq>` after `prefix`, when there is a position to resume from.
   * @param {string} prefix
   */
  _since(prefix) {
    const position = this.position;
    return position ? `${prefix}since=${encodeURIComponent(`${position.epoch}:${position.seq}`)}` : '';
  }

  /**
   * The same dream as Server-Sent Events: the token in the query (EventSource sends no headers),
   * the position in `since`; no pings to answer, no renewal in place.
   * @param {number} run
   * @param {string | undefined} token
   */
  _openEvents(run, token) {
    const ES = this._impl('EventSource');
    const base = this.url.replace(/^ws(s?):/, 'http$1:');
    const query = (token ? `?token=${encodeURIComponent(token)}` : '') + this._since(token ? '&' : '?');
    /** @type {EventSource} */
    let es;
    try {
      es = new ES(`${base}/events${query}`);
    } catch (error) {
      this._emit('error', { type: 'error', code: 'connect_failed', message: String(/** @type {any} */ (error)?.message ?? error) });
      if (run === this._run) this._scheduleReconnect({});
      return;
    }
    this._es = es;
    /** @param {MessageEvent} event */
    const onEvent = (event) => {
      if (this._es === es) this._onMessage(event.data);
    };
    for (const type of ['connection_established', 'image_update', 'token_refreshed']) es.addEventListener(type, onEvent);
    es.addEventListener('error', (event) => {
      if (this._es !== es) return;
      // The server's `error` event has data; a failed or ended stream has none. EventSource
      // would then retry by itself, at a fixed pace, offline or not, and with the token it
      // started with: the client retries instead, as for a WebSocket, and resumes with `since`.
      if (/** @type {MessageEvent} */ (event).data !== undefined) onEvent(/** @type {MessageEvent} */ (event));
      // CLOSED: the browser gave up, so the server answered with a status (a refusal); a network
      // failure leaves it CONNECTING. EventSource hides the status: ask for it once.
      else if (es.readyState === 2) this._refused(es, `${base}/events${query}`);
      else this._onClose(1006, 'event stream failed');
    });
  }

  /**
   * Why an event stream was refused: the status of the same request, as the close code a
   * WebSocket would have had (401 -> 4401, 403 -> 4403, 400 -> 1008, 429/503 -> 1013).
   * @param {EventSource} es
   * @param {string} url
   */
  async _refused(es, url) {
    let code = 1006;
    const get = this._impl('fetch');
    if (get) {
      const abort = new AbortController();
      try {
        const { status } = await get(url, { signal: abort.signal });
        /** @type {Record<number, number>} */
        const codes = { 400: 1008, 401: UNAUTHENTICATED, 403: FORBIDDEN, 429: 1013, 503: 1013 };
        code = codes[status] ?? code;
      } catch {
        // The network, after all: retried as any lost stream.
      }
      abort.abort(); // an accepted stream is not read
    }
    if (this._es === es) this._onClose(code, 'event stream refused');
  }

  /** @param {unknown} data */
  _onMessage(data) {
    if (this._ws) this._armWatchdog(); // any frame shows the connection is alive
    let message;
    try {
      message = JSON.parse(String(data));
    } catch {
      return;
    }
    if (!message || typeof message.type !== 'string') return;
    let quiet = false;
    switch (message.type) {
      case 'connection_established': {
        this._openedAt = Date.now();
        this._authRetried = false;
        this._neverOpened = 0;
        this.lastError = null;
        this.recovered = typeof message.recovered === 'boolean' ? message.recovered : null;
        if (this.position && message.epoch !== this.position.epoch && this.recovered === null) this.position = null;
        if (this._ws) {
          this._interval = Number(message.heartbeat_interval) * 1000 || this.options.heartbeatInterval;
          clearInterval(this._pingTimer);
          this._pingTimer = setInterval(() => this.send({ type: 'ping', timestamp: Date.now() / 1000 }), this._interval);
          this._armWatchdog();
        }
        this._setState({ state: 'open', recovered: this.recovered, transport: this.transport });
        // Not resuming: ask what is true now. Resuming, the server sends what was missed or
        // the latest state by itself.
        if (this.recovered === null) this.requestStatus();
        if (this._ws) this._scheduleRefresh(this._expiresAt);
        break;
      }
      case 'token_refreshed':
        this._scheduleRefresh(typeof message.expires_at === 'number' ? message.expires_at * 1000 : null);
        break;
      case 'ping':
        this.send('timestamp' in message ? { type: 'pong', timestamp: message.timestamp } : { type: 'pong' });
        break;
      case 'image_update': {
        const position = this.position;
        const fresh = typeof message.seq === 'number' && typeof message.epoch === 'string';
        // Never an older status over a newer one: an update of the same history that is not
        // newer than the last applied one is dropped (a status answer may repeat it).
        if (fresh && position && message.epoch === position.epoch && message.seq <= position.seq) return;
        if (fresh) this.position = { epoch: message.epoch, seq: message.seq };
        this.lastUpdate = message;
        break;
      }
      case 'error':
        // The answer to request_status for a dream with no update yet: nothing went wrong.
        quiet = message.code === 'status_unknown';
        if (!quiet) this.lastError = message;
        break;
    }
    this._emit('message', message);
    if (!quiet) this._emit(message.type, message);
  }

  /**
   * @param {number} code
   * @param {string} reason
   */
  _onClose(code, reason) {
    const opened = this._openedAt !== 0;
    const websocket = this._ws !== null;
    this._dropSocket();
    if (this._stopped) return;
    if (websocket && !opened && !this._offline() && code !== UNAUTHENTICATED && code !== FORBIDDEN) {
      // WebSocket blocked on the way (a proxy, a firewall)? After a few tries, use SSE. A failure
      // while offline says nothing about the way, and does not count.
      this._neverOpened += 1;
      const ES = this._impl('EventSource');
      if (this.options.transport === 'auto' && ES && this._neverOpened >= this.options.sseAfter) this.transport = 'sse';
    }
    if (code === UNAUTHENTICATED || code === FORBIDDEN) {
      // Retrying cannot mend a refusal, except an expired token that getToken() can renew.
      if (code === UNAUTHENTICATED && this.options.getToken && !this._authRetried) {
        this._authRetried = true;
        this._scheduleReconnect({ code, reason }, 0);
        return;
      }
      this._stopped = true;
      this._setState({ state: 'auth_failed', code, reason, error: this.lastError });
      return;
    }
    this._scheduleReconnect({ code, reason });
  }

  /**
   * @param {{ code?: number, reason?: string }} cause
   * @param {number} [delay] ms; default: capped exponential backoff with full jitter
   */
  _scheduleReconnect(cause, delay) {
    if (this._openedAt && Date.now() - this._openedAt >= this.options.stableAfter) this._attempt = 0;
    this._openedAt = 0;
    clearTimeout(this._retryTimer);
    this._retryTimer = null;
    this._waiting = true;
    if (this._offline()) {
      // Every attempt would fail until the network is back, which the `online` event tells.
      this._setState({ state: 'reconnecting', ...cause, offline: true });
      return;
    }
    const ceiling = Math.min(this.options.backoffMax, this.options.backoffBase * 2 ** this._attempt);
    // Full jitter: clients dropped together (a server restart) come back spread out.
    const wait = delay ?? Math.random() * ceiling;
    this._attempt = Math.min(this._attempt + 1, 30);
    // Gone offline in the meantime: wait for `online` rather than try.
    this._retryTimer = setTimeout(() => (this._offline() ? this._scheduleReconnect(cause) : this._open('reconnecting')), wait);
    // After the timer is set: a listener that calls close() cancels it.
    this._setState({ state: 'reconnecting', ...cause, attempt: this._attempt, delay: Math.round(wait) });
  }

  /** @param {number | null} expiresAt ms since the epoch, when the connection's token expires */
  _scheduleRefresh(expiresAt) {
    clearTimeout(this._refreshTimer);
    this._refreshTimer = null;
    if (!this.options.getToken || expiresAt == null) return;
    const left = expiresAt - Date.now();
    if (left < MIN_REFRESH_LEAD) return;
    // A quarter of the lifetime at most: a short-lived token is not renewed the moment it arrives.
    // A margin that is not a number must not become a delay of 0, renewing again and again.
    const margin = Math.min(left / 4, Math.max(0, this.options.refreshMargin) || 0);
    const ws = this._ws;
    this._refreshTimer = setTimeout(() => this._refresh(ws, expiresAt, 0), Math.min(left - margin, MAX_DELAY));
  }

  /**
   * @param {WebSocket | null} ws the socket whose token is renewed
   * @param {number} expiresAt ms since the epoch
   * @param {number} failures getToken() failures so far, the backoff exponent
   */
  async _refresh(ws, expiresAt, failures) {
    this._refreshTimer = null;
    // A timer can fire late (a busy or throttled page): past the expiry the server closes with
    // 4401 whatever we send, and reconnecting asks getToken() again.
    if (Date.now() >= expiresAt) return;
    let token;
    try {
      token = await /** @type {() => string | Promise<string>} */ (this.options.getToken)();
      if (typeof token !== 'string' || !token.trim()) throw new TypeError('getToken() returned no token');
    } catch (error) {
      if (this._ws !== ws) return;
      this._emit('error', tokenUnavailable(error));
      // Retry while a retry can still beat the expiry; after that the server closes with 4401,
      // and reconnecting asks getToken() again.
      const wait = Math.min(this.options.backoffMax, this.options.backoffBase * 2 ** failures);
      if (this._ws === ws && Date.now() + wait + RETRY_LEAD < expiresAt) {
        this._refreshTimer = setTimeout(() => this._refresh(ws, expiresAt, failures + 1), wait);
      }
      return;
    }
    if (this._ws === ws) this.send({ type: 'refresh_token', token: token.trim() });
  }

  _armWatchdog() {
    clearTimeout(this._watchdog);
    // The server pings every interval, so two intervals of silence mean a dead connection
    // (a sleeping laptop, a dropped NAT entry) that may never report a close by itself.
    const limit = this._interval ? 2 * this._interval : this.options.connectTimeout;
    this._watchdog = setTimeout(() => {
      const ws = this._ws;
      this._onClose(HEARTBEAT_TIMEOUT, 'no message from the server in time');
      // After _onClose has let go of it: a half-open socket may take long to finish closing.
      ws?.close(HEARTBEAT_TIMEOUT, 'heartbeat timeout');
    }, limit);
  }

  _dropSocket() {
    clearInterval(this._pingTimer);
    clearTimeout(this._watchdog);
    clearTimeout(this._refreshTimer);
    this._pingTimer = this._watchdog = this._refreshTimer = null;
    this._interval = 0;
    this._expiresAt = null;
    this._ws = null;
    this._es?.close();
    this._es = null;
  }

  _stop() {
    this._stopped = true;
    this._run += 1;
    this._waiting = false;
    clearTimeout(this._retryTimer);
    this._retryTimer = null;
    const ws = this._ws;
    this._dropSocket();
    ws?.close(1000, 'client closed');
    if (this.state !== 'closed') this._setState({ state: 'closed', code: 1000 });
  }

  /** @param {StateChange} change */
  _setState(change) {
    this.state = change.state;
    this._emit('state', change);
  }

  /**
   * @param {string} type
   * @param {any} event
   */
  _emit(type, event) {
    for (const callback of [...(this._listeners.get(type) ?? [])]) {
      try {
        callback(event);
      } catch (error) {
        report(error);
      }
    }
  }
}

export default DreamSocket;
