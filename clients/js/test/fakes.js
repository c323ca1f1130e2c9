// Small stand-ins for what the client takes from the page, driven by the tests: a WebSocket and an
// EventSource that record what the client does and let the test play the server, and a page
// whose network and visibility the test switches.

/** A WebSocket class of its own for each test, with the list of the sockets it made. */
export function fakeWebSocket() {
  return class FakeWebSocket {
    /** @type {FakeWebSocket[]} */
    static all = [];

    /**
     * @param {string} url
     * @param {string[]} protocols
     */
    constructor(url, protocols) {
      this.url = url;
      this.protocols = protocols;
      this.readyState = 0;
      /** @type {any[]} */
      this.sent = [];
      /** @type {{ code: number, reason: string } | null} */
      this.closed = null;
      /** @type {((event: any) => void) | null} */ this.onmessage = null;
      /** @type {((event: any) => void) | null} */ this.onclose = null;
      /** @type {((event: any) => void) | null} */ this.onerror = null;
      FakeWebSocket.all.push(this);
    }

    /** @param {string} text */
    send(text) {
      this.sent.push(JSON.parse(text));
    }

    /**
     * @param {number} code
     * @param {string} reason
     */
    close(code, reason) {
      this.closed = { code, reason };
      this.readyState = 3;
    }

    // -- the server's side --

    /** Accept the handshake and greet, as the server does. */
    greet(fields = {}) {
      this.readyState = 1;
      this.push({ type: 'connection_established', dream_id: 7, heartbeat_interval: 30, epoch: 'e1', seq: 0, ...fields });
    }

    /** @param {object} message */
    push(message) {
      this.onmessage?.({ data: JSON.stringify(message) });
    }

    /** The connection ends with `code`. */
    drop(code = 1006, reason = '') {
      this.readyState = 3;
      this.onclose?.({ code, reason });
    }
  };
}

/** An EventSource class of its own for each test, with the list of the streams it made. */
export function fakeEventSource() {
  return class FakeEventSource extends EventTarget {
    /** @type {FakeEventSource[]} */
    static all = [];

    /** @param {string} url */
    constructor(url) {
      super();
      this.url = url;
      this.readyState = 0;
      FakeEventSource.all.push(this);
    }

    close() {
      this.readyState = 2;
    }

    // -- the server's side --

    /**
     * One event of the stream, as the server writes it (`event: <type>`, `data: <json>`).
     * @param {{ type: string }} message
     */
    emit(message) {
      this.readyState = 1;
      this.dispatchEvent(Object.assign(new Event(message.type), { data: JSON.stringify(message) }));
    }

    /** The stream failed or ended: EventSource fires `error` with no data. */
    fail() {
      this.readyState = 0; // EventSource would now retry by itself
      this.dispatchEvent(new Event('error'));
    }

    /** The server answered with a status other than 200: EventSource closes, retries nothing. */
    refuse() {
      this.readyState = 2;
      this.dispatchEvent(new Event('error'));
    }
  };
}

/** A page (`window`) with a document and a navigator, online and visible to begin with. */
export class FakePage extends EventTarget {
  constructor() {
    super();
    this.navigator = { onLine: true };
    this.document = Object.assign(new EventTarget(), { visibilityState: 'visible' });
    this.location = { protocol: 'https:', host: 'app.example' };
  }

  offline() {
    this.navigator.onLine = false;
    this.dispatchEvent(new Event('offline'));
  }

  online() {
    this.navigator.onLine = true;
    this.dispatchEvent(new Event('online'));
  }

  /** @param {'visible' | 'hidden'} state */
  visibility(state) {
    this.document.visibilityState = state;
    this.document.dispatchEvent(new Event('visibilitychange'));
  }
}

/** A JWT whose `exp` is `exp` (seconds); the signature is never checked by the client. */
export function jwt(exp, sub = 'user-1') {
  const part = (/** @type {object} */ value) => Buffer.from(JSON.stringify(value)).toString('base64url');
  return `${part({ alg: 'HS256', typ: 'JWT' })}.${part({ sub, exp })}.c2ln`;
}

/**
 * Lets promises and microtasks run (an awaited getToken(), the first connect) without letting
 * time pass: setImmediate is not among the timers the tests mock.
 */
export function settle() {
  return new Promise((resolve) => setImmediate(resolve));
}
