// The Python package serves starlette_dream_ws/static/dream-ws.js (and ships the .d.ts beside it):
// committed copies of src/ written by `npm run build`. This fails as soon as one drifts.
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { it } from 'node:test';

import { outputs } from '../scripts/build.mjs';

it('the static copies are what `npm run build` writes from src/', async () => {
  for (const { path, text } of await outputs()) {
    assert.ok(readFileSync(path, 'utf8') === text, `${path} differs from its source: run \`npm run build\` in clients/js`);
  }
});
