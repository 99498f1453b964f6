'use strict';
/*
 * execbox Node.js driver: runs *inside* the sandbox, never on the host.
 *
 * Says "ready" on its events fd, waits for one request on its control fd, loads the user's code as a
 * CommonJS module (with or without `module.exports = { main };`), calls
 * `main(arguments)` (sync or async) and reports the outcome on fd 4. stdout and stderr
 * are exactly what the program printed. After the report it blocks until the host
 * destroys the sandbox. Node's standard library only.
 */
const fs = require('fs');
const Module = require('module');
const path = require('path');

const CONTROL_FD = Number(process.env.EXECBOX_CONTROL_FD || 3);
const EVENTS_FD = Number(process.env.EXECBOX_EVENTS_FD || 4);
delete process.env.EXECBOX_CONTROL_FD;
delete process.env.EXECBOX_EVENTS_FD;
const USER_FILE = path.join(process.cwd(), 'main.js');
const NETWORK_CODES = new Set(['EAFNOSUPPORT', 'ENETUNREACH', 'ECONNREFUSED', 'EHOSTUNREACH', 'EAI_AGAIN',
  'ENOTFOUND', 'EADDRNOTAVAIL', 'ETIMEDOUT', 'ECONNRESET', 'ERR_NETWORK']);
const FILE_CODES = new Set(['EACCES', 'EPERM', 'EROFS']);

function readExact(size) {
  const buf = Buffer.alloc(size);
  let off = 0;
  while (off < size) {
    const n = fs.readSync(CONTROL_FD, buf, off, size - off, null);
    if (n === 0) throw new Error('control channel closed');
    off += n;
  }
  return buf;
}

function recv() {
  return JSON.parse(readExact(readExact(4).readUInt32BE(0)).toString('utf8'));
}

function send(message) {
  const body = Buffer.from(JSON.stringify(message), 'utf8');
  const head = Buffer.alloc(4);
  head.writeUInt32BE(body.length, 0);
  const data = Buffer.concat([head, body]);
  let off = 0;
  while (off < data.length) off += fs.writeSync(EVENTS_FD, data, off, data.length - off);
}

function errorKind(err) {
  const seen = new Set();
  const stack = [err];
  while (stack.length) {
    const e = stack.pop();
    if (!e || typeof e !== 'object' || seen.has(e)) continue;
    seen.add(e);
    if (e instanceof RangeError && /allocation failed|Invalid array length|out of memory/i.test(e.message)) return 'memory';
    if (NETWORK_CODES.has(e.code)) return 'network';
    if (FILE_CODES.has(e.code)) return 'file';
    stack.push(e.cause, e.error);
    if (Array.isArray(e.errors)) stack.push(...e.errors);
  }
  return null;
}

function prepare(request) {
  for (const [name, content] of Object.entries(request.files || {})) {
    const target = path.normalize(name);
    if (path.isAbsolute(target) || target.startsWith('..')) continue;
    fs.mkdirSync(path.dirname(target), { recursive: true });
    fs.writeFileSync(target, Buffer.from(content, 'base64'));
  }
  Object.assign(process.env, request.env || {});
}

function loadMain(code) {
  const mod = new Module(USER_FILE, null);
  mod.filename = USER_FILE;
  mod.paths = Module._nodeModulePaths(process.cwd()).concat((process.env.NODE_PATH || '').split(':').filter(Boolean));
  const exporter = '\n;if (typeof main === "function" && !(module.exports && typeof module.exports.main === "function"))' +
    ' { if (module.exports === null || typeof module.exports !== "object") module.exports = {}; module.exports.main = main; }\n';
  mod._compile(code + exporter, USER_FILE);
  const exported = mod.exports;
  if (typeof exported === 'function') return exported;
  return exported && typeof exported.main === 'function' ? exported.main : null;
}

async function run(request) {
  let main;
  try {
    main = loadMain(request.code);
  } catch (err) {
    process.stderr.write(String((err && err.stack) || err) + '\n');
    return { exitCode: 1, result: null, kind: errorKind(err) };
  }
  if (!main) {
    process.stderr.write('ReferenceError: the code defines no function main()\n');
    return { exitCode: 1, result: null, kind: null };
  }
  try {
    const value = await main(request.arguments || {});
    let encoded;
    try {
      encoded = JSON.stringify(value === undefined ? null : value);
    } catch (err) {
      process.stderr.write(`TypeError: main() returned a value that is not JSON-serialisable: ${err.message}\n`);
      return { exitCode: 1, result: null, kind: null };
    }
    return { exitCode: 0, result: { present: true, value: JSON.parse(encoded) }, kind: null };
  } catch (err) {
    process.stderr.write(String((err && err.stack) || err) + '\n');
    return { exitCode: 1, result: null, kind: errorKind(err) };
  }
}

function finish(outcome, started) {
  send({
    event: 'done', exit_code: outcome.exitCode, result: outcome.result, error_kind: outcome.kind,
    time_ms: Number(process.hrtime.bigint() - started) / 1e6,
  });
  try { fs.readSync(CONTROL_FD, Buffer.alloc(1), 0, 1, null); } finally { process.reallyExit(outcome.exitCode); }
}

function driver() {
  fs.mkdirSync('artifacts', { recursive: true });
  send({ event: 'ready' });
  const request = recv();
  prepare(request);
  const started = process.hrtime.bigint();
  const realExit = process.exit.bind(process);
  process.exit = (code) => finish({ exitCode: (code === undefined ? (process.exitCode || 0) : code) & 0xff, result: null, kind: null }, started) || realExit(code);
  process.on('uncaughtException', (err) => {
    process.stderr.write(String((err && err.stack) || err) + '\n');
    finish({ exitCode: 1, result: null, kind: errorKind(err) }, started);
  });
  run(request).then((outcome) => finish(outcome, started));
}

driver();
