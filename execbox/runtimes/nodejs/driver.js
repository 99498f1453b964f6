'use strict';
/*
 * execbox Node.js driver: runs *inside* the sandbox, never on the host.
 *
 * Says "ready" on its events fd, waits for one request on its control fd, loads the user's code as a
 * CommonJS module (with or without `module.exports = { main };`), calls
 * `main(arguments)` (sync or async) and reports the outcome on its events fd. stdout and stderr
 * are exactly what the program printed. After the report it blocks until the host
 * destroys the sandbox. Node's standard library only (with egress, undici from the runtime environment).
 *
 * - The channel fds and the request's token live in this function's closure, never in
 *   module scope, globals, require.cache or the environment (EXECBOX_*_FD are deleted
 *   first). The host believes only a report that carries the token.
 * - stdout and stderr write synchronously (fs.writeSync): a write to a pipe is otherwise
 *   asynchronous in Node, and what is still queued when main returns (or process.exit is
 *   called) would be lost; synchronous writes also let the host's output cap stop a
 *   program that writes without end. Before the report the driver also waits for both
 *   streams to drain (worker threads' output reaches them through the main thread).
 * - Tracebacks are printed without the driver's own frames and Node's module loader.
 * - A request with a `cell` member starts a session: each frame is a cell run with
 *   vm.Script in the one global scope (top-level let/const/function persist, as in Node's
 *   REPL; top-level `await` is rewritten the REPL's way with the `acorn` parser of the runtime
 *   environment), interrupted at `cell.timeout_s`; the value of a final expression
 *   statement is the result. After each report the driver waits for the next cell.
 */
(function driver() {
  const fs = require('fs');
  const Module = require('module');
  const path = require('path');

  const CONTROL_FD = Number(process.env.EXECBOX_CONTROL_FD || 3);
  const EVENTS_FD = Number(process.env.EXECBOX_EVENTS_FD || 4);
  delete process.env.EXECBOX_CONTROL_FD;
  delete process.env.EXECBOX_EVENTS_FD;
  const USER_FILE = path.join(process.cwd(), 'main.js');
  const DRIVER_FILE = __filename;
  const MAX_RESULT_DEPTH = 100; // the same caps as the host's (execbox.wire)
  const MAX_RESULT_BYTES = 16 << 20;
  const NETWORK_CODES = new Set(['EAFNOSUPPORT', 'ENETUNREACH', 'ECONNREFUSED', 'EHOSTUNREACH', 'EAI_AGAIN',
    'ENOTFOUND', 'EADDRNOTAVAIL', 'ETIMEDOUT', 'ECONNRESET', 'ERR_NETWORK']);
  const FILE_CODES = new Set(['EACCES', 'EPERM', 'EROFS']);
  let token = null;
  let finished = false;

  const SLEEPER = new Int32Array(new SharedArrayBuffer(4));

  /** Write all of ``chunk`` to ``fd`` now (waiting out EAGAIN on a non-blocking pipe). */
  function writeAllSync(fd, chunk, encoding) {
    const data = typeof chunk === 'string' ? Buffer.from(chunk, typeof encoding === 'string' ? encoding : 'utf8')
      : Buffer.from(chunk.buffer, chunk.byteOffset, chunk.byteLength);
    let off = 0;
    while (off < data.length) {
      try {
        off += fs.writeSync(fd, data, off, data.length - off);
      } catch (err) {
        if (err.code !== 'EAGAIN') throw err;
        Atomics.wait(SLEEPER, 0, 0, 1);
      }
    }
  }

  // stdout and stderr write synchronously: nothing is queued in the process, whatever
  // libuv does with the pipe (gVisor's host pipes ignore setBlocking), so nothing is lost
  // when main returns or the program exits, and the host's output cap sees every byte.
  for (const [stream, fd] of [[process.stdout, 1], [process.stderr, 2]]) {
    if (stream._handle && typeof stream._handle.setBlocking === 'function') stream._handle.setBlocking(true);
    stream.write = function write(chunk, encoding, callback) {
      if (typeof encoding === 'function') { callback = encoding; encoding = undefined; }
      try {
        writeAllSync(fd, chunk, encoding);
      } catch (err) {
        if (err.code !== 'EPIPE') throw err; // the host stopped reading: the run is ending
      }
      if (typeof callback === 'function') process.nextTick(callback);
      return true;
    };
  }

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

  /** The error's stack without the driver's frames and Node's module loader. */
  function describe(err) {
    let text;
    try {
      text = String((err && err.stack) || err);
    } catch (_) {
      text = 'Error (cannot be printed)';
    }
    return text.split('\n').filter((line) => !(/^\s+at /.test(line) &&
      (line.includes(DRIVER_FILE) || line.includes('node:internal/modules/') || line.includes('(node:vm:')))).join('\n');
  }

  function printError(err) {
    process.stderr.write(describe(err) + '\n');
  }

  function prepare(request) {
    try {
      for (const [name, content] of Object.entries(request.files || {})) {
        const target = path.normalize(name);
        if (path.isAbsolute(target) || target.startsWith('..') || target === '.') continue;
        fs.mkdirSync(path.dirname(target), { recursive: true });
        fs.writeFileSync(target, Buffer.from(content, 'base64'));
      }
      Object.assign(process.env, request.env || {});
      return true;
    } catch (err) {
      process.stderr.write(`execbox: cannot prepare the input files or environment: ${err.message}\n`);
      return false;
    }
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

  /** Nesting depth of a JSON text (brackets outside strings). */
  function depthOf(text) {
    let depth = 0;
    let deepest = 0;
    let inString = false;
    for (let i = 0; i < text.length; i++) {
      const c = text.charCodeAt(i);
      if (inString) {
        if (c === 92) i++; // backslash: skip the escaped character
        else if (c === 34) inString = false;
      } else if (c === 34) inString = true;
      else if (c === 91 || c === 123) { depth++; if (depth > deepest) deepest = depth; }
      else if (c === 93 || c === 125) depth--;
    }
    return deepest;
  }

  /** {result} or {problem} for the value main returned (JSON.stringify's rules: NaN -> null). */
  function encodeResult(value) {
    let encoded;
    try {
      encoded = JSON.stringify(value === undefined ? null : value);
    } catch (err) {
      return { problem: `TypeError: main() returned a value that is not JSON-serialisable: ${err.message}` };
    }
    if (encoded === undefined) encoded = 'null'; // a function or a symbol
    if (depthOf(encoded) > MAX_RESULT_DEPTH) {
      return { problem: `ValueError: main() returned a value execbox cannot carry: the value is nested deeper than ${MAX_RESULT_DEPTH} levels` };
    }
    const size = Buffer.byteLength(encoded, 'utf8');
    if (size > MAX_RESULT_BYTES) {
      return { problem: `ValueError: main() returned ${size} bytes of JSON, more than ${MAX_RESULT_BYTES}` };
    }
    return { result: { present: true, value: JSON.parse(encoded) } };
  }

  async function run(request) {
    let main;
    try {
      main = loadMain(request.code);
    } catch (err) {
      printError(err);
      return { exitCode: 1, result: null, kind: errorKind(err) };
    }
    if (!main) {
      process.stderr.write('ReferenceError: the code defines no function main()\n');
      return { exitCode: 1, result: null, kind: null };
    }
    try {
      const value = await main(request.arguments || {});
      const { result, problem } = encodeResult(value);
      if (problem) {
        process.stderr.write(problem + '\n');
        return { exitCode: 1, result: null, kind: 'result' };
      }
      return { exitCode: 0, result, kind: null };
    } catch (err) {
      printError(err);
      return { exitCode: 1, result: null, kind: errorKind(err) };
    }
  }

  /** Names bound by a declaration pattern (`{a, b: [c, ...d]} = ...`). */
  function boundNames(pattern, names) {
    if (!pattern) return names;
    if (pattern.type === 'Identifier') names.push(pattern.name);
    else if (pattern.type === 'ObjectPattern') pattern.properties.forEach((p) => boundNames(p.type === 'RestElement' ? p.argument : p.value, names));
    else if (pattern.type === 'ArrayPattern') pattern.elements.forEach((e) => boundNames(e, names));
    else if (pattern.type === 'RestElement') boundNames(pattern.argument, names);
    else if (pattern.type === 'AssignmentPattern') boundNames(pattern.left, names);
    return names;
  }

  /**
   * A cell with top-level `await`, rewritten as Node's REPL does: its declarations are
   * hoisted to the script (const becomes let) so that later cells see them, the rest runs
   * in an async function whose value is the last expression's.
   */
  function wrapAwait(code, tree) {
    const hoisted = [];
    const functions = [];
    const body = [];
    tree.body.forEach((node, i) => {
      const text = code.slice(node.start, node.end);
      if (node.type === 'VariableDeclaration') {
        const names = [];
        node.declarations.forEach((d) => boundNames(d.id, names));
        if (names.length) hoisted.push(`${node.kind === 'var' ? 'var' : 'let'} ${names.join(', ')};`);
        const assigns = node.declarations.filter((d) => d.init)
          .map((d) => `(${code.slice(d.id.start, d.id.end)} = ${code.slice(d.init.start, d.init.end)})`);
        if (assigns.length) body.push(`void (${assigns.join(', ')});`);
      } else if (node.type === 'FunctionDeclaration') {
        hoisted.push(`var ${node.id.name};`);
        functions.push(`${node.id.name} = ${text};`);
      } else if (node.type === 'ClassDeclaration') {
        hoisted.push(`let ${node.id.name};`);
        body.push(`${node.id.name} = ${text};`);
      } else if (i === tree.body.length - 1 && node.type === 'ExpressionStatement') {
        body.push(`return (${code.slice(node.expression.start, node.expression.end)});`);
      } else {
        body.push(text);
      }
    });
    return `${hoisted.join('\n')}\n(async () => {\n${functions.join('\n')}\n${body.join('\n')}\n})()`;
  }

  /** A cell's result: JSON for plain data, else util.inspect's text; undefined is none. */
  function cellValue(value) {
    if (value === undefined) return { present: false, value: null };
    const proto = value !== null && typeof value === 'object' ? Object.getPrototypeOf(value) : undefined;
    const plain = value === null || ['string', 'number', 'boolean'].includes(typeof value) || Array.isArray(value) ||
      proto === Object.prototype || proto === null;
    if (plain) {
      const { result, problem } = encodeResult(value);
      if (!problem) return result;
    }
    let text;
    try {
      text = require('util').inspect(value);
    } catch (err) {
      text = `<${typeof value} (inspect failed: ${err && err.message})>`;
    }
    return { present: true, value: text.slice(0, 1 << 20), type: 'text' };
  }

  /** runCell(request) -> outcome: a cell in the one global scope kept across cells. */
  function cellRunner() {
    const vm = require('vm');
    let acorn = null;
    try {
      acorn = require('acorn');
    } catch (_) { /* without it: no top-level await, and every value is a result */ }
    globalThis.require = Module.createRequire(USER_FILE);
    globalThis.module = { exports: {} };
    globalThis.exports = globalThis.module.exports;
    globalThis.__filename = USER_FILE;
    globalThis.__dirname = path.dirname(USER_FILE);
    let cells = 0;
    const state = { fail: null };
    process.on('uncaughtException', (err) => {
      printError(err);
      if (state.fail) state.fail(err);
    });
    const timeoutError = (limit) => Object.assign(new Error(`the cell ran longer than ${limit}s`), { timedOut: true });
    async function runCell(request) {
      if (request.code) cells += 1; // the session's set-up cell is empty
      const filename = `cell-${cells}.js`;
      const limit = Number((request.cell && request.cell.timeout_s) || 0);
      const deadline = Date.now() + limit * 1000;
      const code = request.code;
      let tree = null;
      if (acorn) {
        try {
          tree = acorn.parse(code, { ecmaVersion: 'latest', sourceType: 'script', allowAwaitOutsideFunction: true, allowHashBang: true });
        } catch (_) { /* V8 says what is wrong below */ }
      }
      try {
        let script;
        let awaited = false;
        try {
          script = new vm.Script(code, { filename });
        } catch (err) {
          if (!(tree && err instanceof SyntaxError)) throw err;
          script = new vm.Script(wrapAwait(code, tree), { filename });
          awaited = true;
        }
        let value = script.runInThisContext({ timeout: Math.max(1, deadline - Date.now()), displayErrors: false });
        if (awaited) {
          let timer;
          value = await new Promise((resolve, reject) => {
            state.fail = reject;
            timer = setTimeout(() => reject(timeoutError(limit)), Math.max(1, deadline - Date.now()));
            Promise.resolve(value).then(resolve, reject);
          }).finally(() => { clearTimeout(timer); state.fail = null; });
        }
        const last = tree && tree.body.length ? tree.body[tree.body.length - 1] : null;
        const isExpression = tree ? Boolean(last && last.type === 'ExpressionStatement' && !last.directive) : true;
        return { exitCode: 0, result: isExpression ? cellValue(value) : { present: false, value: null }, kind: null };
      } catch (err) {
        if ((err && err.code === 'ERR_SCRIPT_EXECUTION_TIMEOUT') || (err && err.timedOut)) {
          process.stderr.write(`TimeoutError: the cell ran longer than ${limit}s and was interrupted; the session keeps its state\n`);
          return { exitCode: 1, result: null, kind: 'time' };
        }
        printError(err);
        return { exitCode: 1, result: null, kind: errorKind(err) };
      }
    }
    return runCell;
  }

  /** A session: cells until the host closes the control channel or a cell exits. */
  async function serveCells(request) {
    const runCell = cellRunner();
    process.exit = (code) => process.reallyExit(Number(code === undefined ? (process.exitCode || 0) : code) & 0xff);
    for (;;) {
      const cellToken = typeof request.token === 'string' ? request.token : null;
      delete request.token;
      const started = process.hrtime.bigint();
      const outcome = prepare(request) ? await runCell(request) : { exitCode: 1, result: null, kind: null };
      const message = {
        event: 'done', exit_code: outcome.exitCode, result: outcome.result, error_kind: outcome.kind,
        time_ms: Number(process.hrtime.bigint() - started) / 1e6,
      };
      if (cellToken !== null) message.token = cellToken;
      send(message);
      try {
        request = recv(); // blocks: between cells the interpreter waits, timers included
      } catch (_) {
        process.reallyExit(0);
      }
    }
  }

  function report(outcome, started) {
    if (finished) return;
    finished = true;
    const message = {
      event: 'done', exit_code: outcome.exitCode, result: outcome.result, error_kind: outcome.kind,
      time_ms: Number(process.hrtime.bigint() - started) / 1e6,
    };
    if (token !== null) message.token = token;
    send(message);
    try { fs.readSync(CONTROL_FD, Buffer.alloc(1), 0, 1, null); } finally { process.reallyExit(outcome.exitCode); }
  }

  /** Report once stdout and stderr have written everything queued (blocking: at once). */
  function finish(outcome, started) {
    let pending = 2;
    const done = () => { if (--pending === 0) report(outcome, started); };
    for (const stream of [process.stdout, process.stderr]) {
      if (stream.writableLength === 0 || stream.destroyed) done();
      else stream.write('', done);
    }
  }

  /**
   * With egress (request.egress = {port, socket}): a bridge on 127.0.0.1:port, in the sandbox's own
   * network namespace, forwards each connection to the egress proxy's UNIX socket; global fetch
   * uses the proxy through undici's ProxyAgent, installed at its first call (Node 20's fetch
   * ignores HTTP_PROXY; CONNECT for https). axios reads HTTP_PROXY/HTTPS_PROXY (set in the request's env) itself and tunnels https
   * with CONNECT. Without egress: nothing at all.
   */
  function startEgress(egress) {
    if (!egress) return;
    const net = require('net');
    const server = net.createServer({ allowHalfOpen: true }, (client) => {
      const upstream = net.connect({ path: egress.socket, allowHalfOpen: true });
      const end = () => { client.destroy(); upstream.destroy(); };
      for (const sock of [client, upstream]) { sock.on('error', end); sock.on('close', end); }
      client.pipe(upstream);
      upstream.pipe(client);
    });
    server.on('error', (err) => process.stderr.write(`execbox: the egress bridge failed: ${err.message}\n`));
    server.listen(egress.port, '127.0.0.1');
    server.unref();
    // undici takes ~0.2 s to load: only at the first fetch, so that code without fetch pays nothing
    const fetchDirectly = globalThis.fetch;
    let proxied = false;
    globalThis.fetch = function fetch(...args) {
      if (!proxied) {
        proxied = true;
        try {
          const { ProxyAgent, setGlobalDispatcher } = require('undici');
          setGlobalDispatcher(new ProxyAgent(`http://127.0.0.1:${egress.port}`));
        } catch (err) {
          process.stderr.write(`execbox: fetch cannot use the egress proxy (${err.message}); run execbox build\n`);
        }
      }
      return fetchDirectly.apply(this, args);
    };
  }

  /**
   * Run a constant program the way a request's runs (compile it as a module, call main,
   * encode the result) before saying ready: V8 compiles the driver's and the module
   * loader's functions lazily, on first use, so that work is done now, while the sandbox
   * waits warm, rather than while a request waits.
   */
  function warm() {
    const warmMain = loadMain('function main(args) { return { value: [args.text, 1, 2.5, null, true] }; }');
    encodeResult(warmMain({ text: 'warm' }));
    JSON.parse(JSON.stringify({ event: 'done', exit_code: 0, result: null }));
  }

  function main() {
    fs.mkdirSync('artifacts', { recursive: true });
    warm();
    send({ event: 'ready' });
    const request = recv();
    if (request.cell) {
      serveCells(request);
      return;
    }
    token = typeof request.token === 'string' ? request.token : null;
    delete request.token;
    startEgress(request.egress);
    delete request.egress;
    const started = process.hrtime.bigint();
    if (!prepare(request)) {
      finish({ exitCode: 1, result: null, kind: null }, started);
      return;
    }
    process.exit = (code) => {
      const exitCode = Number(code === undefined ? (process.exitCode || 0) : code) & 0xff;
      report({ exitCode, result: null, kind: null }, started);
    };
    process.on('uncaughtException', (err) => {
      printError(err);
      report({ exitCode: 1, result: null, kind: errorKind(err) }, started);
    });
    run(request).then((outcome) => finish(outcome, started));
  }

  main();
})();
