"""A throwaway ``redis-server`` for the tests: loopback only, a free port, a temporary directory,
no persistence; stopped (and its directory removed) by :meth:`RedisServer.stop`.

``redis_unavailable_reason()`` is why one cannot be started here (Debian's ``redis-server``
is missing: ``make setup`` installs it); ``yield from redis_for_tests(__name__)`` in a
fixture gives the URL of a fresh server, or skips with that reason printed.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

__all__ = ["RedisServer", "free_port", "redis_for_tests", "redis_unavailable_reason"]

START_TIMEOUT_S = 20.0


def redis_unavailable_reason() -> str | None:
    if shutil.which("redis-server") is None:
        return "redis-server is not installed (Debian's redis-server package; `make setup` installs it)"
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """``RedisServer().start()``; ``.url`` is ``redis://127.0.0.1:PORT/0``."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="execbox-redis-"))
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.port = free_port()
        args = [
            "redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.root),
            "--save", "", "--appendonly", "no", "--protected-mode", "yes", "--daemonize", "no",
            "--logfile", str(self.root / "redis.log"),
        ]
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                log = (self.root / "redis.log").read_text(errors="replace") if (self.root / "redis.log").exists() else ""
                raise RuntimeError(f"redis-server exited with {self.process.returncode}:\n{log}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not answer on port {self.port} within {START_TIMEOUT_S:g}s")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.root, ignore_errors=True)


def redis_for_tests(owner: str) -> Iterator[str]:
    """For a fixture: the URL of a fresh server, stopped afterwards; a skip, with the reason
    printed, where none can be started."""
    reason = redis_unavailable_reason()
    if reason is not None:
        print(f"\nSKIP {owner}: {reason}", file=sys.stderr)
        pytest.skip(reason)
    server = RedisServer().start()
    try:
        yield server.url
    finally:
        server.stop()
