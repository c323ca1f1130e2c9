// Writes the copies of the client that the Python package serves (`<mount>/dream-ws.js`, typings
// beside it) from src/: the same text, unminified, under a line that names the source. They are
// committed, so `--check` writes nothing and fails when a copy differs from what it would write.
//
//   node scripts/build.mjs           write starlette_dream_ws/static/dream-ws.{js,d.ts}
//   node scripts/build.mjs --check   exit 1 if either differs
import { readFile, writeFile } from 'node:fs/promises';
import { fileURLToPath, pathToFileURL } from 'node:url';

const SOURCE = new URL('../src/', import.meta.url);
const STATIC = new URL('../../../starlette_dream_ws/static/', import.meta.url);
const FILES = ['dream-ws.js', 'dream-ws.d.ts'];

/**
 * What the build writes: one entry per file, with its path and full text.
 * @returns {Promise<{ path: string, text: string }[]>}
 */
export async function outputs() {
  return Promise.all(
    FILES.map(async (name) => ({
      path: fileURLToPath(new URL(name, STATIC)),
      text:
        `// Generated from clients/js/src/${name} by \`npm run build\` in clients/js: edit that file.\n` +
        (await readFile(new URL(name, SOURCE), 'utf8')),
    })),
  );
}

/**
 * The outputs whose file on disk differs (or is missing).
 * @returns {Promise<string[]>} their paths
 */
export async function stale() {
  const found = [];
  for (const { path, text } of await outputs()) {
    const current = await readFile(path, 'utf8').catch(() => null);
    if (current !== text) found.push(path);
  }
  return found;
}

if (import.meta.url === pathToFileURL(process.argv[1]).href) {
  if (process.argv.includes('--check')) {
    const paths = await stale();
    for (const path of paths) console.error(`${path} differs from its source: run \`npm run build\` in clients/js`);
    if (paths.length) process.exit(1);
    console.log('the static copies match src/');
  } else {
    for (const { path, text } of await outputs()) {
      await writeFile(path, text);
      console.log(`wrote ${path}`);
    }
  }
}
