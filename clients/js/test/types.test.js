// The hand-written typings (src/dream-ws.d.ts) against the module and its JSDoc: the same
// exports, the same public members, the same options and state fields. A name added to one side
// only fails here. (That the typings compile for a consumer is ci.sh's `tsc` step.)
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { describe, it } from 'node:test';

import * as client from '../src/dream-ws.js';

const DTS = readFileSync(new URL('../src/dream-ws.d.ts', import.meta.url), 'utf8');
const JS = readFileSync(new URL('../src/dream-ws.js', import.meta.url), 'utf8');

/**
 * The body of `<head> {` ... `}` in the typings, up to the closing brace at the start of a line.
 * @param {string} head e.g. `export interface StateChange`
 */
function block(head) {
  const start = DTS.indexOf(`${head} {`);
  assert.notEqual(start, -1, `${head} is missing from the typings`);
  return DTS.slice(start, DTS.indexOf('\n}', start));
}

/**
 * The members declared in a block: one per line, two spaces in (nested object types and comments
 * are skipped).
 * @param {string} body
 */
function members(body) {
  const names = [...body.matchAll(/^ {2}(?:readonly )?(\w+)\??[:<(]/gm)].map((match) => match[1]);
  return new Set(names.filter((name) => name !== 'constructor'));
}

/**
 * The `@property` names of a JSDoc `@typedef {Object} <name>` in the module.
 * @param {string} name
 */
function jsdocProperties(name) {
  const start = JS.indexOf(`@typedef {Object} ${name}\n`);
  assert.notEqual(start, -1, `the JSDoc typedef ${name} is missing from the module`);
  const body = JS.slice(start, JS.indexOf('*/', start));
  // A type may span lines and hold one level of braces: `{{ onLine?: boolean }}`.
  return new Set([...body.matchAll(/@property \{(?:[^{}]|\{[^{}]*\})*\} \[?(\w+)/g)].map((match) => match[1]));
}

/**
 * The field names of a JSDoc `@typedef {{ ... }} <name>` (an object literal type) in the module.
 * @param {string} name
 */
function jsdocFields(name) {
  const end = JS.search(new RegExp(`\\}\\} ${name}\\b`));
  assert.notEqual(end, -1, `the JSDoc typedef ${name} is missing from the module`);
  const body = JS.slice(JS.lastIndexOf('@typedef {{', end), end);
  return new Set([...body.matchAll(/(\w+)\??:/g)].map((field) => field[1]));
}

/** @param {string} text the members of a string-literal union, e.g. `'a' | 'b'` */
function literals(text) {
  return new Set([...text.matchAll(/'(\w+)'/g)].map((match) => match[1]));
}

describe('the typings match the module', () => {
  it('declares exactly what the module exports', () => {
    const declared = new Set([...DTS.matchAll(/^export (?:declare )?(?:class|function|const) (\w+)/gm)].map((m) => m[1]));
    if (/^export default \w+;$/m.test(DTS)) declared.add('default');
    assert.deepEqual(declared, new Set(Object.keys(client)));
  });

  it('declares every public member of DreamSocket, and nothing else', () => {
    const socket = new client.DreamSocket({ dreamId: 1, url: 'ws://localhost/ws', token: 't', autoConnect: false });
    const fields = Object.keys(socket);
    const methods = Object.getOwnPropertyNames(client.DreamSocket.prototype).filter((name) => name !== 'constructor');
    const runtime = new Set([...fields, ...methods].filter((name) => !name.startsWith('_')));
    assert.deepEqual(members(block('export class DreamSocket')), runtime);
  });

  it('has the options of the JSDoc, and the module reads no other', () => {
    const declared = members(block('export interface DreamSocketOptions'));
    assert.deepEqual(declared, jsdocProperties('DreamSocketOptions'));
    const read = new Set([...JS.matchAll(/\boptions\??\.(\w+)/g)].map((match) => match[1]));
    for (const name of read) assert.ok(declared.has(name), `the module reads options.${name}, not in the typings`);
  });

  it('has the fields of a state change, and the states', () => {
    assert.deepEqual(members(block('export interface StateChange')), jsdocFields('StateChange'));
    const states = DTS.match(/^export type ConnectionState = ([^;]+);/m);
    const jsdoc = JS.match(/@typedef \{([^}]+)\} ConnectionState/);
    assert.ok(states && jsdoc);
    assert.deepEqual(literals(states[1]), literals(jsdoc[1]));
  });

  it('describes the same page as the JSDoc', () => {
    assert.deepEqual(members(block('export interface DreamSocketPage')), jsdocProperties('Page'));
  });
});
