// useDreamStatus: the live status of one dream in a React component, through dream-ws-client.
//
//   const { status, images, message, connection } = useDreamStatus(dreamId, {
//     url: 'wss://api.example.com/ws',
//     getToken: fetchToken,
//   });
//
// One connection per mounted hook and dream: it opens after the first render, moves to another
// dream when `dreamId` changes, and closes on unmount. Rendering on the server opens nothing
// (effects do not run there), and importing dream-ws-client there is safe.
import { useEffect, useRef, useState } from 'react';
import { DreamSocket } from 'dream-ws-client';

/** @typedef {import('dream-ws-client').DreamSocketOptions} DreamSocketOptions */
/** @typedef {import('dream-ws-client').ImageUpdate} ImageUpdate */
/** @typedef {import('dream-ws-client').ErrorMessage} ErrorMessage */
/** @typedef {import('dream-ws-client').ConnectionState} ConnectionState */

/**
 * What the hook returns.
 * @typedef {Object} DreamStatus
 * @property {ImageUpdate['status'] | null} status The latest status; null before the first update.
 * @property {readonly string[]} images The latest image URLs.
 * @property {string | null} message The latest update's message.
 * @property {ImageUpdate | null} update The latest update, whole.
 * @property {ConnectionState} connection `connecting`, `open`, `reconnecting`, `closed` or
 *   `auth_failed` (the token was refused for good: show a sign-in prompt, say).
 * @property {boolean} offline The browser is offline; the client reconnects when it is back.
 * @property {boolean | null} recovered After a reconnect: every missed update came back (true)
 *   or only the latest state (false); null before any reconnect.
 * @property {ErrorMessage | null} error The latest error, cleared when a connection opens.
 */

// One empty list for every render: a component that memoizes on `images` does not redo its work.
const NO_IMAGES = Object.freeze(/** @type {string[]} */ ([]));

/** @type {Omit<DreamStatus, 'status' | 'images' | 'message'> & { dreamId: unknown }} */
const INITIAL = { dreamId: undefined, update: null, connection: 'connecting', offline: false, recovered: null, error: null };

/**
 * @param {number | string | null | undefined} dreamId The dream to watch; null or undefined: none.
 * @param {Omit<DreamSocketOptions, 'dreamId'>} options `url`, and `getToken` (or `token`), at
 *   least. A new `url`, `transport` or `token` reconnects; a new `getToken` function does not
 *   (the latest one is used at the next call), so an inline arrow function is fine.
 * @returns {DreamStatus}
 */
export function useDreamStatus(dreamId, options) {
  const [view, setView] = useState(INITIAL);

  // The caller's latest options, for calls that happen long after the render that set them up.
  const latest = useRef(options);
  useEffect(() => {
    latest.current = options;
  });

  const { url, transport, token } = options;
  useEffect(() => {
    if (dreamId == null) return undefined;
    const { getToken } = latest.current;
    const socket = new DreamSocket({
      ...latest.current,
      dreamId,
      getToken: getToken && (() => (latest.current.getToken ?? getToken)()),
      // Listeners first, then connect: none of the first events is missed.
      autoConnect: false,
    });

    // Updates for this dream only: what another dream left in the state is started over.
    /** @param {Partial<typeof INITIAL>} change */
    const patch = (change) =>
      setView((previous) => ({ ...(previous.dreamId === dreamId ? previous : { ...INITIAL, dreamId }), ...change }));

    const stop = [
      socket.on('state', ({ state, offline = false, recovered }) =>
        patch({ connection: state, offline, ...(state === 'open' ? { recovered: recovered ?? null, error: null } : {}) }),
      ),
      socket.on('image_update', (update) => patch({ update })),
      socket.on('error', (error) => patch({ error })),
    ];
    socket.connect();
    return () => {
      // Listeners off before close(): its `closed` state must not reach an unmounted component.
      for (const off of stop) off();
      socket.close();
    };
  }, [dreamId, url, transport, token]);

  // Until the connection for this dream reports, nothing of another dream shows.
  const current = view.dreamId === dreamId ? view : { ...INITIAL, connection: dreamId == null ? 'closed' : 'connecting' };
  return {
    status: current.update?.status ?? null,
    images: current.update?.images ?? NO_IMAGES,
    message: current.update?.message ?? null,
    update: current.update,
    connection: /** @type {ConnectionState} */ (current.connection),
    offline: current.offline,
    recovered: current.recovered,
    error: current.error,
  };
}

export default useDreamStatus;
