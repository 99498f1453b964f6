"""execbox Python driver: runs *inside* the sandbox, never on the host.

Started by the sandbox, it imports the preloaded modules, says ``ready`` on its events fd,
waits for one request on its control fd, runs ``main(**arguments)`` (``async def main`` too) and reports
the outcome on its events fd. stdout and stderr are exactly what the program printed. After the
report it blocks until the host destroys the sandbox. Standard library only.

A request with a ``cell`` member starts a session instead: each frame is a cell run in one
namespace kept across cells (no ``main``; the last expression statement's value is the
result, as JSON or else as its repr; top-level ``await`` runs in one event loop kept across
cells), interrupted by SIGALRM at ``cell.timeout_s`` (reported as ``error_kind: "time"``);
after each report the driver waits for the next cell.

The channel fds and the request's token live in locals of :func:`serve` (and closures
made there), never in module globals or the environment: user code cannot reach them by
name (``sys.modules["driver"]``, ``__main__``, ``os.environ``). The host believes only a
report that carries the token (see ``execbox.isolation.supervise``).

What ``main`` returns becomes JSON as a data user expects (see :func:`_plain`): numpy
scalars as numbers, arrays as (nested) lists, a DataFrame as a list of row objects, a
Series as a list (default index) or an object keyed by its index, timestamps and dates as
ISO 8601 strings, NaN/NaT/NA and infinities as null.
"""

import json
import math
import os
import sys
import time

USER_FILE = "main.py"
#: the same caps as the host's (execbox.wire): deeper or larger results are refused here first
MAX_RESULT_DEPTH = 100
MAX_RESULT_BYTES = 16 << 20
_NETWORK_ERRNOS = {97, 101, 111, 113, 99, 110}  # EAFNOSUPPORT ENETUNREACH ECONNREFUSED EHOSTUNREACH EADDRNOTAVAIL ETIMEDOUT
_FILE_ERRNOS = {1, 13, 30}  # EPERM EACCES EROFS


class _Refused(ValueError):
    pass


def _key(key):
    """An object key as json.dumps writes it (numpy and pandas keys too)."""
    if isinstance(key, str):
        return key
    if key is None or isinstance(key, bool | int | float):
        return json.dumps(key if not isinstance(key, float) or math.isfinite(key) else None)
    try:
        converted = _convert(key)
    except TypeError:
        return str(key)
    if converted is key or isinstance(converted, dict | list):
        return str(key)
    return _key(converted)


def _convert(value):
    """One step of conversion of a non-JSON value, or TypeError."""
    kind = type(value)
    module = kind.__module__ or ""
    if module.startswith("numpy"):
        if hasattr(value, "tolist"):  # ndarray and numpy scalars (np.int64, np.float64, np.bool_ ...)
            return value.tolist()
    if module.startswith("pandas"):
        name = kind.__name__
        if name == "DataFrame":
            return value.to_dict(orient="records")
        if name == "Series":
            index = value.index
            if type(index).__name__ == "RangeIndex" and index.start == 0 and index.step == 1:
                return value.tolist()
            return {_key(k): v for k, v in value.items()}
        if name in ("NaTType", "NAType"):
            return None
        if hasattr(value, "isoformat"):  # Timestamp, Timedelta
            return value.isoformat()
        if hasattr(value, "tolist"):  # Index, Categorical ...
            return value.tolist()
    if hasattr(value, "isoformat") and module == "datetime":
        return value.isoformat()
    if kind.__name__ == "Decimal":
        return float(value)
    raise TypeError(f"Object of type {kind.__name__} is not JSON serializable")


def _plain(value, depth=0):
    """A JSON value for what main returned; _Refused when too deep, TypeError for no form."""
    while True:
        if value is None or isinstance(value, bool | int | str):
            return value
        if isinstance(value, float):
            return value if math.isfinite(value) else None
        if depth >= MAX_RESULT_DEPTH:
            raise _Refused(f"the value is nested deeper than {MAX_RESULT_DEPTH} levels")
        if isinstance(value, dict):
            return {_key(k): _plain(v, depth + 1) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [_plain(v, depth + 1) for v in value]
        converted = _convert(value)
        if converted is value:
            raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")
        value = converted


def _encode_result(value):
    """(result, None) or (None, message) for the value main returned."""
    try:
        plain = _plain(value)
        size = len(json.dumps(plain, allow_nan=False))
    except _Refused as exc:
        return None, f"ValueError: main() returned a value execbox cannot carry: {exc}"
    except (TypeError, ValueError, RecursionError) as exc:
        return None, (f"TypeError: main() returned a value of type {type(value).__name__} "
                      f"that is not JSON-serialisable: {exc}")
    if size > MAX_RESULT_BYTES:
        return None, f"ValueError: main() returned {size} bytes of JSON, more than {MAX_RESULT_BYTES}"
    return {"present": True, "value": plain}, None


def _read_exact(fd, size):
    chunks = []
    while size:
        chunk = os.read(fd, size)
        if not chunk:
            raise EOFError("control channel closed")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def _channel(control_fd, events_fd):
    """(recv, send, wait) bound to the channel fds, which stay in their closures."""

    def recv():
        size = int.from_bytes(_read_exact(control_fd, 4), "big")
        return json.loads(_read_exact(control_fd, size))

    def send(message):
        data = json.dumps(message).encode()
        data = len(data).to_bytes(4, "big") + data
        while data:
            data = data[os.write(events_fd, data):]

    def wait():
        os.read(control_fd, 1)

    return recv, send, wait


def _error_kind(exc):
    """Classify an uncaught exception: memory, network, file, or None."""
    seen = set()
    stack = [exc]
    while stack:
        err = stack.pop()
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        if isinstance(err, MemoryError):
            return "memory"
        module = type(err).__module__ or ""
        name = type(err).__name__
        if name == "gaierror" or (isinstance(err, OSError) and err.errno in _NETWORK_ERRNOS):
            return "network"
        if module.startswith(("requests", "urllib3")) and "Connection" in name:
            return "network"
        if isinstance(err, OSError) and err.errno in _FILE_ERRNOS:
            return "file"
        stack.extend([err.__cause__, err.__context__, getattr(err, "reason", None)])
        stack.extend(a for a in getattr(err, "args", ()) if isinstance(a, BaseException))
    return None


def _print_exception(exc):
    """Print the traceback with the driver's own frames left out."""
    import traceback

    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    traceback.print_exception(type(exc), exc, tb, file=sys.stderr)


def _prepare(request):
    """Write the input files and set the environment; False (said on stderr) if impossible."""
    import base64

    for name, content in (request.get("files") or {}).items():
        path = os.path.normpath(name)
        if path.startswith(("/", "..")) or path == ".":
            continue
        try:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            with open(path, "wb") as fh:
                fh.write(base64.b64decode(content))
        except (OSError, ValueError) as exc:
            print(f"execbox: cannot write the input file {name!r}: {exc}", file=sys.stderr)
            return False
    for key, value in (request.get("env") or {}).items():
        try:
            os.environ[key] = value
        except (OSError, ValueError) as exc:
            print(f"execbox: cannot set the environment variable {key!r}: {exc}", file=sys.stderr)
            return False
    if request.get("stdin"):
        import io

        sys.stdin = io.TextIOWrapper(io.BytesIO(request["stdin"].encode("utf-8", "replace")), encoding="utf-8")
    return True


def _bridge(listener, path):
    """Forward every TCP connection accepted on ``listener`` to the UNIX socket ``path`` (the
    egress proxy), both ways, in this one thread: a side reads only when what it read last
    has been written (no buffering beyond one chunk), and its end is passed on as a half-close."""
    import selectors
    import socket

    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    peer, out, eof = {}, {}, set()

    def update(sock):
        events = selectors.EVENT_READ if sock not in eof and not out[peer[sock]] else 0
        events |= selectors.EVENT_WRITE if out[sock] else 0
        registered = sock in sel.get_map()
        if events:
            (sel.modify if registered else sel.register)(sock, events)
        elif registered:
            sel.unregister(sock)

    def close(sock):
        for one in (sock, peer[sock]):
            if one in sel.get_map():
                sel.unregister(one)
            one.close()
            peer.pop(one, None)
            out.pop(one, None)
            eof.discard(one)

    while True:
        for key, mask in sel.select():
            sock = key.fileobj
            if sock is listener:
                client, _ = listener.accept()
                upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    upstream.connect(path)
                except OSError:
                    client.close()
                    upstream.close()
                    continue
                for one, other in ((client, upstream), (upstream, client)):
                    one.setblocking(False)
                    peer[one], out[one] = other, b""
                update(client)
                update(upstream)
                continue
            if sock not in peer:  # closed earlier in this round
                continue
            other = peer[sock]
            try:
                if mask & selectors.EVENT_WRITE and out[sock]:
                    out[sock] = out[sock][sock.send(out[sock]):]
                    if not out[sock] and other in eof:
                        sock.shutdown(socket.SHUT_WR)
                if mask & selectors.EVENT_READ and sock not in eof and not out[other]:
                    data = sock.recv(1 << 16)
                    if data:
                        out[other] = data
                    else:
                        eof.add(sock)
                        if not out[other]:
                            other.shutdown(socket.SHUT_WR)
            except OSError:
                close(sock)
                continue
            if sock in eof and other in eof and not out[sock] and not out[other]:
                close(sock)
                continue
            update(sock)
            update(other)


def _start_egress_bridge(request):
    """With egress (``request["egress"]``), listen on the sandbox's own loopback at its port
    and bridge each connection to the proxy's socket; HTTP_PROXY and HTTPS_PROXY (in the
    request's env) point there. Without egress: nothing at all.

    The bridge is a forked process holding only the listener, not a thread: the driver stays
    single-threaded, so a syscall the seccomp filter kills still ends the program (gVisor
    kills only the calling thread, where Linux kills the whole process)."""
    egress = request.pop("egress", None)
    if not egress:
        return
    import socket

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", int(egress["port"])))
    listener.listen(64)
    if os.fork() == 0:
        try:
            kept = listener.fileno()
            os.closerange(0, kept)  # nothing of the driver: its channels, the program's output
            os.closerange(kept + 1, 1 << 16)
            _bridge(listener, egress["socket"])
        finally:
            os._exit(0)
    listener.close()


def _run(request):
    """Run the user's program; returns (exit_code, result, error_kind)."""
    import linecache

    code = request["code"]
    linecache.cache[USER_FILE] = (len(code), None, code.splitlines(True), USER_FILE)
    namespace = {"__name__": "main", "__file__": USER_FILE, "__builtins__": __builtins__}
    try:
        exec(compile(code, USER_FILE, "exec"), namespace)
        main = namespace.get("main")
        if not callable(main):
            print("NameError: the code defines no function main()", file=sys.stderr)
            return 1, None, None
        value = main(**(request.get("arguments") or {}))
        if hasattr(value, "__await__"):
            import asyncio

            async def _await(awaitable):
                return await awaitable

            value = asyncio.run(_await(value))
        result, problem = _encode_result(value)
        if problem is not None:
            print(problem, file=sys.stderr)
            return 1, None, "result"
        return 0, result, None
    except SystemExit as exc:
        code = exc.code
        if code is None:
            return 0, None, None
        if isinstance(code, int):
            return code & 0xFF, None, None
        print(code, file=sys.stderr)
        return 1, None, None
    except BaseException as exc:  # the user's program failed: report, never crash the driver
        return _failed(exc)


def _failed(exc):
    """(1, None, error_kind) for a program that raised ``exc``, its traceback printed."""
    kind = _error_kind(exc)
    try:
        _print_exception(exc)
    except MemoryError:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
    return 1, None, kind


class _CellTimeout(BaseException):
    """Raised in a cell by the driver's alarm at the cell's time limit."""


#: the longest text result (a repr) a cell returns
MAX_TEXT_RESULT_CHARS = 1 << 20


def _cell_value(value):
    """The result of a cell's last expression: JSON when it can be, else its repr as text;
    None (like an assignment) is no result."""
    if value is None:
        return {"present": False, "value": None}
    result, problem = _encode_result(value)
    if problem is None:
        return result
    try:
        text = repr(value)
    except Exception as exc:  # a broken __repr__ is the program's: say so as the text
        text = f"<{type(value).__name__} object (repr failed: {type(exc).__name__})>"
    return {"present": True, "value": text[:MAX_TEXT_RESULT_CHARS], "type": "text"}


def _cell_runner():
    """A function that runs one cell in a namespace kept across cells, with top-level
    ``await`` in one event loop kept across cells; returns (exit_code, result, error_kind)."""
    import ast
    import inspect
    import linecache
    import signal

    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    state = {"cells": 0, "loop": None}
    flags = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT

    def evaluate(code):
        value = eval(code, namespace)
        if code.co_flags & inspect.CO_COROUTINE:
            if state["loop"] is None:
                import asyncio

                state["loop"] = asyncio.new_event_loop()
            value = state["loop"].run_until_complete(value)
        return value

    def alarm(signum, frame):
        raise _CellTimeout()

    def run_cell(request):
        source = request["code"]
        state["cells"] += bool(source)  # the session's set-up cell is empty
        name = f"<cell {state['cells']}>"
        linecache.cache[name] = (len(source), None, source.splitlines(True), name)
        timeout_s = float(request["cell"].get("timeout_s") or 0)
        previous = signal.signal(signal.SIGALRM, alarm)
        try:
            try:
                signal.setitimer(signal.ITIMER_REAL, timeout_s)
                tree = compile(source, name, "exec", flags | ast.PyCF_ONLY_AST)
                last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
                evaluate(compile(tree, name, "exec", flags))
                value = evaluate(compile(ast.Expression(last.value), name, "eval", flags)) if last else None
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except _CellTimeout:
            print(f"TimeoutError: the cell ran longer than {timeout_s:g}s and was interrupted; "
                  "the session keeps its state", file=sys.stderr)
            return 1, None, "time"
        except SystemExit:
            raise  # sys.exit() ends the session's interpreter
        except BaseException as exc:  # the cell failed: report, the session lives on
            return _failed(exc)
        finally:
            signal.signal(signal.SIGALRM, previous)
        return 0, _cell_value(value), None

    return run_cell


#: what the driver itself imports when it runs a request (lazily, so that a driver started
#: on its own starts fast); a fork server imports them once, for every sandbox it forks
#: (inside gVisor each import in a sandbox costs a dozen system calls through the sentry)
_DRIVER_MODULES = ("linecache", "traceback", "base64")


def preload():
    """Import the driver's own modules and those named in EXECBOX_PRELOAD (missing ones
    are skipped); called by the fork server, before it forks any sandbox."""
    for module in (*_DRIVER_MODULES, *filter(None, os.environ.pop("EXECBOX_PRELOAD", "").split(","))):
        try:
            __import__(module)
        except Exception:  # a missing optional module must not stop the sandbox
            pass


#: run through the driver's own path before ``ready`` (see :func:`_warm`)
_WARM_CODE = "def main(text='warm'):\n    return {'value': [text, 1, 2.5, None, True]}\n"


def _warm():
    """Run a constant program the way a request's runs (compile, exec, main, the result to
    JSON) before saying ready. In a sandbox forked from the fork server the pages that this
    path writes (reference counts, the interpreter's caches) are copied now, while the
    sandbox waits warm, rather than while a request waits (inside gVisor each such
    copy-on-write fault is costly). Nothing of it stays but what the driver itself holds."""
    import linecache

    _run({"code": _WARM_CODE, "arguments": {}})
    linecache.cache.pop(USER_FILE, None)


def serve(control_fd, events_fd):
    """Say ready, run one request, report, then block until the sandbox is destroyed."""
    for name in ("EXECBOX_CONTROL_FD", "EXECBOX_EVENTS_FD"):
        os.environ.pop(name, None)
    recv, send, wait = _channel(control_fd, events_fd)
    del control_fd, events_fd
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(line_buffering=True, errors="backslashreplace")
    cache = os.environ.pop("EXECBOX_MPL_CACHE", "")
    if cache and os.path.isdir(cache):
        target = os.environ.get("MPLCONFIGDIR", "/tmp/matplotlib")
        os.makedirs(target, exist_ok=True)
        for name in os.listdir(cache):
            with open(os.path.join(cache, name), "rb") as src, open(os.path.join(target, name), "wb") as dst:
                dst.write(src.read())
    os.makedirs("artifacts", exist_ok=True)
    _warm()
    send({"event": "ready"})
    request = recv()
    _start_egress_bridge(request)
    run_cell = _cell_runner() if "cell" in request else None
    while True:
        token = request.pop("token", None)
        started = time.perf_counter()
        try:
            if _prepare(request):
                exit_code, result, kind = run_cell(request) if run_cell else _run(request)
            else:
                exit_code, result, kind = 1, None, None
        except SystemExit as exc:  # a cell called sys.exit(): the session's interpreter ends
            _flush()
            os._exit(exc.code if isinstance(exc.code, int) else 1)
        del request
        elapsed_ms = (time.perf_counter() - started) * 1000.0
        _flush()
        report = {"event": "done", "exit_code": exit_code, "result": result, "error_kind": kind, "time_ms": elapsed_ms}
        if token is not None:
            report["token"] = token
        del token
        send(report)
        if run_cell is None:
            break
        try:
            request = recv()  # the session's next cell
        except EOFError:
            os._exit(0)
    try:
        wait()  # block until the host destroys the sandbox
    finally:
        os._exit(exit_code)


def _flush():
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass


if __name__ == "__main__":
    serve(int(os.environ.pop("EXECBOX_CONTROL_FD", "3")), int(os.environ.pop("EXECBOX_EVENTS_FD", "4")))
