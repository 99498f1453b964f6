"""execbox Python driver: runs *inside* the sandbox, never on the host.

Started by the sandbox, it imports the preloaded modules, says ``ready`` on its events fd,
waits for one request on its control fd, runs ``main(**arguments)`` (``async def main`` too) and reports
the outcome on fd 4. stdout and stderr are exactly what the program printed. After the
report it blocks until the host destroys the sandbox. Standard library only.
"""

import json
import os
import sys
import time

CONTROL_FD = 3
EVENTS_FD = 4
USER_FILE = "main.py"
_NETWORK_ERRNOS = {97, 101, 111, 113, 99, 110}  # EAFNOSUPPORT ENETUNREACH ECONNREFUSED EHOSTUNREACH EADDRNOTAVAIL ETIMEDOUT
_FILE_ERRNOS = {1, 13, 30}  # EPERM EACCES EROFS


def _read_exact(fd, size):
    chunks = []
    while size:
        chunk = os.read(fd, size)
        if not chunk:
            raise EOFError("control channel closed")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def _recv():
    size = int.from_bytes(_read_exact(CONTROL_FD, 4), "big")
    return json.loads(_read_exact(CONTROL_FD, size))


def _send(message):
    data = json.dumps(message).encode()
    data = len(data).to_bytes(4, "big") + data
    while data:
        data = data[os.write(EVENTS_FD, data):]


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
    import base64

    for name, content in (request.get("files") or {}).items():
        path = os.path.normpath(name)
        if path.startswith(("/", "..")):
            continue
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(base64.b64decode(content))
    os.environ.update(request.get("env") or {})
    if request.get("stdin"):
        import io

        sys.stdin = io.TextIOWrapper(io.BytesIO(request["stdin"].encode()), encoding="utf-8")


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
        try:
            json.dumps(value)
        except (TypeError, ValueError) as exc:
            print(
                f"TypeError: main() returned a value of type {type(value).__name__} "
                f"that is not JSON-serialisable: {exc}",
                file=sys.stderr,
            )
            return 1, None, None
        return 0, {"present": True, "value": value}, None
    except SystemExit as exc:
        code = exc.code
        if code is None:
            return 0, None, None
        if isinstance(code, int):
            return code & 0xFF, None, None
        print(code, file=sys.stderr)
        return 1, None, None
    except BaseException as exc:  # the user's program failed: report, never crash the driver
        kind = _error_kind(exc)
        try:
            _print_exception(exc)
        except MemoryError:
            print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1, None, kind


def preload():
    """Import the modules named in EXECBOX_PRELOAD (missing ones are skipped)."""
    for module in filter(None, os.environ.pop("EXECBOX_PRELOAD", "").split(",")):
        try:
            __import__(module)
        except Exception:  # a missing optional module must not stop the sandbox
            pass


def serve(control_fd, events_fd):
    """Say ready, run one request, report, then block until the sandbox is destroyed."""
    global CONTROL_FD, EVENTS_FD
    CONTROL_FD, EVENTS_FD = control_fd, events_fd
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
    _send({"event": "ready"})
    request = _recv()
    _prepare(request)
    started = time.perf_counter()
    exit_code, result, kind = _run(request)
    elapsed_ms = (time.perf_counter() - started) * 1000.0
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    _send({"event": "done", "exit_code": exit_code, "result": result, "error_kind": kind, "time_ms": elapsed_ms})
    try:
        os.read(CONTROL_FD, 1)  # block until the host destroys the sandbox
    finally:
        os._exit(exit_code)


if __name__ == "__main__":
    serve(int(os.environ.pop("EXECBOX_CONTROL_FD")), int(os.environ.pop("EXECBOX_EVENTS_FD")))
