// Generated from clients/js/src/dream-ws.d.ts by `npm run build` in clients/js: edit that file.
// Types of dream-ws.js, the browser client of starlette_dream_ws (wire protocol v1.1).
// Hand-written; clients/js/test/types.test.js checks them against the module.

export type ConnectionState = 'connecting' | 'open' | 'reconnecting' | 'closed' | 'auth_failed';

export type ImageStatus =
  | 'processing'
  | 'completed'
  | 'failed'
  | 'delete_processing'
  | 'delete_completed'
  | 'delete_failed';

/** Any server message: always a string `type`. */
export interface Message {
  type: string;
  [field: string]: unknown;
}

/** Where an update stands in its dream's history: `seq` counts within one `epoch`. */
export interface Position {
  epoch: string;
  seq: number;
}

export interface ConnectionEstablished extends Message {
  type: 'connection_established';
  dream_id: number;
  /** Seconds between the server's pings. */
  heartbeat_interval: number;
  /** The dream's current position (`seq` 0 before its first update). */
  epoch: string;
  seq: number;
  /** When the client resumed: whether every missed update follows (else the latest state). */
  recovered?: boolean;
}

export interface ImageUpdate extends Message {
  type: 'image_update';
  dream_id: number;
  status: ImageStatus;
  /** Image URLs. */
  images: string[];
  /** Seconds since the epoch, set by the producer. */
  timestamp: number;
  message: string | null;
  seq: number;
  epoch: string;
}

/** The answer to `refresh_token`: the connection now runs on the new token. */
export interface TokenRefreshed extends Message {
  type: 'token_refreshed';
  /** When the new token expires, in seconds since the epoch; null when it has no `exp`. */
  expires_at: number | null;
}

export interface ErrorMessage extends Message {
  type: 'error';
  /**
   * Machine-readable: the server's (`unauthenticated`, `forbidden`, ...) or the client's own:
   * `token_unavailable` (getToken failed, when connecting or renewing the token), `invalid_token`
   * (not sendable: auth_failed follows, after one retry with getToken), `connect_failed` (the
   * browser refused to open the WebSocket).
   */
  code: string;
  message: string;
}

export interface StateChange {
  state: ConnectionState;
  /** Close code that caused the change. */
  code?: number;
  reason?: string;
  /** Reconnect attempt number (state `reconnecting`). */
  attempt?: number;
  /** Milliseconds until that attempt. */
  delay?: number;
  /**
   * State `reconnecting`: the browser is offline (`navigator.onLine` is false), so no attempt is
   * scheduled; the next one starts on the `online` event.
   */
  offline?: boolean;
  /** The server's last `error` message (state `auth_failed`). */
  error?: ErrorMessage | null;
  /** State `open` after a resume: true, every missed update follows; false, the latest state. */
  recovered?: boolean | null;
  /** State `open`: the transport in use. */
  transport?: 'websocket' | 'sse';
}

export interface DreamSocketEvents {
  state: StateChange;
  /** Every server message. */
  message: Message;
  connection_established: ConnectionEstablished;
  image_update: ImageUpdate;
  token_refreshed: TokenRefreshed;
  /** Server errors (not `status_unknown`, the normal answer for a dream with no update yet). */
  error: ErrorMessage;
}

type Listen = (type: string, listener: (event: any) => void) => void;

/**
 * What the client uses of the page: `window` in a browser. Every part is optional: where one is
 * missing (Node, SSR) the client goes without it.
 */
export interface DreamSocketPage {
  /** `online`, `pagehide` and `pageshow` are heard here. */
  addEventListener?: Listen;
  removeEventListener?: Listen;
  /** `visibilitychange` is heard here. */
  document?: { visibilityState?: string; addEventListener?: Listen; removeEventListener?: Listen };
  navigator?: { onLine?: boolean };
  /** For the default `url`. */
  location?: { protocol: string; host: string };
  WebSocket?: typeof WebSocket;
  EventSource?: typeof EventSource;
  fetch?: typeof fetch;
}

export interface DreamSocketOptions {
  dreamId: number | string;
  /**
   * WebSocket base where the app is mounted, e.g. `wss://example.com/ws`. Default: the folder the
   * module was served from (`/ws/dream-ws.js` gives `/ws`), else `/ws` on the page's host. Pass it
   * when the module comes from npm through a bundler.
   */
  url?: string;
  /** A JWT, sent in the subprotocol list (never in the URL). */
  token?: string;
  /**
   * Returns a fresh JWT; called before each reconnect, and allows one retry after close 4401.
   * Also called before the connection's token expires (its `exp` claim), to renew it in place
   * with `refresh_token`; on failure retried with backoff until the expiry. Surrounding
   * whitespace is ignored.
   */
  getToken?: () => string | Promise<string>;
  /**
   * Milliseconds before the token's `exp` to renew it (with `getToken`); at most a quarter of
   * the token's remaining lifetime (default 60000).
   */
  refreshMargin?: number;
  /** Milliseconds between pings until the server announces its interval (default 30000). */
  heartbeatInterval?: number;
  /** Milliseconds a handshake may take (default 10000). */
  connectTimeout?: number;
  /** First reconnect delay ceiling in ms (default 500). */
  backoffBase?: number;
  /** Largest reconnect delay in ms (default 15000). */
  backoffMax?: number;
  /** Milliseconds a connection must last for the backoff to start over (default 10000). */
  stableAfter?: number;
  /** Connect right away (default true). */
  autoConnect?: boolean;
  /**
   * `auto` (default): WebSocket, then Server-Sent Events once WebSocket failed `sseAfter` times
   * in a row without ever opening; or one of them only.
   */
  transport?: 'auto' | 'websocket' | 'sse';
  /** WebSocket failures in a row before `auto` falls back to SSE (default 3). */
  sseAfter?: number;
  /** WebSocket implementation (tests, non-browser hosts). Default: the page's. */
  WebSocket?: typeof WebSocket;
  /** EventSource implementation. Default: the page's. */
  EventSource?: typeof EventSource;
  /** Asks why an event stream was refused (EventSource hides the status). Default: the page's. */
  fetch?: typeof fetch;
  /** The page (default `globalThis`): tests and non-browser hosts pass their own. */
  window?: DreamSocketPage;
}

/**
 * Live updates of one dream, over one WebSocket (or event stream) that keeps itself connected.
 *
 * After a lost connection it retries with capped exponential backoff and full jitter
 * (`backoffBase`, `backoffMax`), resuming from `position`. While the browser is offline it does
 * not retry at all (state `reconnecting` with `offline: true`); it retries at once when the
 * browser comes back online (the backoff starting over) or the tab becomes visible again.
 */
export class DreamSocket {
  constructor(options: DreamSocketOptions);
  readonly options: DreamSocketOptions;
  readonly dreamId: number | string;
  /** The full endpoint, `${url}/dreams/${dreamId}`. */
  readonly url: string;
  readonly state: ConnectionState;
  readonly lastUpdate: ImageUpdate | null;
  readonly lastError: ErrorMessage | null;
  /** The position of the last update applied; reconnects resume from it. */
  readonly position: Position | null;
  /** Whether the last connect resumed every missed update (null: it did not resume). */
  readonly recovered: boolean | null;
  readonly transport: 'websocket' | 'sse';
  on<K extends keyof DreamSocketEvents>(type: K, callback: (event: DreamSocketEvents[K]) => void): () => void;
  on(type: string, callback: (event: Message) => void): () => void;
  off<K extends keyof DreamSocketEvents>(type: K, callback: (event: DreamSocketEvents[K]) => void): void;
  off(type: string, callback: (event: Message) => void): void;
  /** Start connecting (done by the constructor unless `autoConnect: false`); idempotent. */
  connect(): void;
  /** Close with 1000 and stop reconnecting; `connect()` starts again. */
  close(): void;
  /** Send one message; false when not connected (nothing is queued). */
  send(message: Message): boolean;
  /** Ask for the dream's latest state (answered by an `image_update`); done on every first connect. */
  requestStatus(): boolean;
}

export default DreamSocket;
