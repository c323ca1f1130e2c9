#!/usr/bin/env bash
# CI of the npm package dream-ws-client: a clean install from the lockfile, the unit tests, the
# module's JSDoc types, the size budget, the copies the Python package serves in step with src/;
# then the package as a consumer gets it: packed, installed from the tarball into a fresh folder,
# imported with node, and its typings compiled against a small TypeScript consumer.
set -euo pipefail
cd "$(dirname "$0")"
here="$(pwd)"
start=$SECONDS

npm ci --no-audit --no-fund
npm test
npm run typecheck
npm run size
npm run check-static

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# What the tarball holds is what `files` lets in, plus what npm always adds.
npm pack --pack-destination "$work" >/dev/null
tarball="$(echo "$work"/dream-ws-client-*.tgz)"
contents="$(tar -tzf "$tarball" | sort | tr '\n' ' ')"
expected="package/README.md package/package.json package/src/dream-ws.d.ts package/src/dream-ws.js "
if [[ "$contents" != "$expected" ]]; then
  echo "unexpected tarball contents: $contents" >&2
  exit 1
fi

consumer="$work/consumer"
mkdir "$consumer"
cd "$consumer"
npm init -y >/dev/null
npm install --no-audit --no-fund "$tarball"

node --input-type=module -e "
import assert from 'node:assert/strict';
import DreamSocketDefault, { DreamSocket } from 'dream-ws-client';

assert.equal(typeof DreamSocket, 'function');
assert.equal(DreamSocketDefault, DreamSocket);
for (const method of ['on', 'off', 'connect', 'close', 'send', 'requestStatus']) {
  assert.equal(typeof DreamSocket.prototype[method], 'function', method);
}
const socket = new DreamSocket({ dreamId: 1, url: 'ws://localhost/ws', token: 'a.b.c', autoConnect: false });
assert.equal(socket.url, 'ws://localhost/ws/dreams/1');
assert.equal(socket.state, 'closed');
console.log('dream-ws-client: imported from its tarball');
"

# The shipped typings, as a strict TypeScript ES module sees them through package.json `exports`.
cat >consumer.mts <<'EOF'
import DreamSocketDefault, { DreamSocket } from 'dream-ws-client';
import type { DreamSocketOptions, ImageUpdate, StateChange } from 'dream-ws-client';

const options: DreamSocketOptions = {
  dreamId: 42,
  url: 'wss://example.com/ws',
  getToken: async () => 'a.b.c',
  transport: 'auto',
  window, // a real page is a DreamSocketPage
};
const socket: DreamSocket = new DreamSocketDefault(options);
const off: () => void = socket.on('image_update', (update: ImageUpdate) => {
  const images: string[] = update.images;
  const seq: number = update.seq;
  console.log(images, seq, update.status === 'completed');
});
socket.on('state', ({ state, offline, delay }: StateChange) => {
  if (state === 'reconnecting') console.log(offline === true ? 'offline' : `in ${delay ?? 0} ms`);
});
// @ts-expect-error: not a connection state
const wrong: StateChange['state'] = 'offline';
// @ts-expect-error: dreamId is required
new DreamSocket({ token: 'a.b.c' });
console.log(wrong, socket.position?.seq, socket.send({ type: 'ping' }));
off();
EOF
cat >tsconfig.json <<'EOF'
{
  "compilerOptions": {
    "strict": true,
    "noEmit": true,
    "target": "es2022",
    "module": "nodenext",
    "moduleResolution": "nodenext",
    "lib": ["es2022", "dom"],
    "types": []
  },
  "files": ["consumer.mts"]
}
EOF
"$here/node_modules/.bin/tsc" -p tsconfig.json
echo "dream-ws-client: the shipped typings compile for a TypeScript consumer"

echo "clients/js/ci.sh passed in $((SECONDS - start)) s"
