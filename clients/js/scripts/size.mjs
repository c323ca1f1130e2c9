// The size budget: src/dream-ws.js minified by esbuild (`--minify --format=esm`), then gzipped at
// level 9, must stay within BUDGET bytes; that is what a page pays for the client over the wire.
import { build } from 'esbuild';
import { fileURLToPath } from 'node:url';
import { gzipSync } from 'node:zlib';

const BUDGET = 4096;
const ENTRY = fileURLToPath(new URL('../src/dream-ws.js', import.meta.url));

const result = await build({ entryPoints: [ENTRY], minify: true, format: 'esm', write: false, logLevel: 'error' });
const minified = result.outputFiles[0].contents;
const gzipped = gzipSync(minified, { level: 9 }).length;
console.log(`src/dream-ws.js: ${minified.length} bytes minified, ${gzipped} bytes min+gzip (budget ${BUDGET})`);
if (gzipped > BUDGET) {
  console.error(`over the budget by ${gzipped - BUDGET} bytes`);
  process.exit(1);
}
