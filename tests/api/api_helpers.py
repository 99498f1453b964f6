"""Helpers of the HTTP contract tests: real execbox services in subprocesses.

Each service is ``python -m execbox.cli serve`` on a free port, started with a clean
environment (no ``SANDBOX_*`` from the caller, no ``.env``: its working directory is
an empty temporary directory) plus the settings the test names, and ready once
``GET /healthz`` answers 200. It uses:

* the backend named by ``EXECBOX_TEST_BACKEND`` (default ``namespaces``);
* its own state directory whose ``runtimes`` is a symlink to the runtime environments
  built by ``make build`` (``SANDBOX_STATE_DIR`` of the caller, else the default), so
  that test services never touch the state of a service started with ``make start``;
* its own range of sandbox uids, so that its processes can be told apart from any
  other service's on the machine.

The whole module is skipped, with the reason printed, when not running as root or
when the backend is unavailable on this host; a service that does not become healthy
is a failure (with the tail of its log), never a skip.
"""

from __future__ import annotations

import base64
import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

BACKEND = os.environ.get("EXECBOX_TEST_BACKEND", "namespaces")
REPO_ROOT = Path(__file__).resolve().parent.parent.parent
START_TIMEOUT_S = 120.0
#: first sandbox uid of the test services; each service gets UID_BLOCK uids of its own
UID_BASE = 64000
UID_BLOCK = 64
_uid_blocks = itertools.count()

RUN_FIELDS = {
    "status", "stdout", "stderr", "exit_code", "detail", "time_used_ms", "memory_used_kb",
    "resource_limit_type", "unauthorized_access_type", "runtime_error_type", "artifacts", "result",
}  # fmt: skip


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def run_body(code: str, language: str | None = None, arguments: Any = None) -> dict[str, Any]:
    body: dict[str, Any] = {"code_b64": b64(code)}
    if language is not None:
        body["language"] = language
    if arguments is not None:
        body["arguments"] = arguments
    return body


def _backend_unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "tests/api need root: the namespaces backend uses cgroups and per-sandbox uids (run `make test` as root)"
    from execbox.errors import BackendUnavailableError
    from execbox.service.backends import build_backend
    from execbox.settings import Settings

    try:
        build_backend(BACKEND, Settings.load()).check()
    except BackendUnavailableError as exc:
        return f"the {BACKEND} backend is unavailable on this host: {exc}"
    return None


def _runtime_dir() -> Path:
    from execbox.settings import Settings

    return Settings.load().runtime_dir


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Service:
    """One execbox service in a subprocess (see the module docstring)."""

    def __init__(
        self, name: str, settings: dict[str, str] | None = None, runtimes: tuple[str, ...] | None = None,
        empty_runtimes: tuple[str, ...] = (),
    ) -> None:
        self.name = name
        block = next(_uid_blocks)
        self.uid_range = range(UID_BASE + block * UID_BLOCK, UID_BASE + (block + 1) * UID_BLOCK)
        self.root = Path(tempfile.mkdtemp(prefix=f"execbox-api-{name}-"))
        self.root.chmod(0o755)  # sandboxes (other uids) bind paths below it
        self.state_dir = self.root / "state"
        self.workdir = self.root / "cwd"
        (self.state_dir / "runtimes").mkdir(parents=True)
        self.workdir.mkdir()
        source = _runtime_dir()
        for runtime in runtimes if runtimes is not None else tuple(p.name for p in source.iterdir() if p.is_dir()):
            (self.state_dir / "runtimes" / runtime).symlink_to(source / runtime)
        for runtime in empty_runtimes:  # present, but with nothing in it: its sandboxes cannot start
            (self.state_dir / "runtimes" / runtime).mkdir()
        self.settings = {
            "SANDBOX_BACKEND": BACKEND,
            "SANDBOX_EXECUTOR_MANAGER_POOL_SIZE": "2",
            "SANDBOX_STATE_DIR": str(self.state_dir),
            "SANDBOX_UID_BASE": str(self.uid_range.start),
            "SANDBOX_UID_COUNT": str(UID_BLOCK),
            "SANDBOX_LOG_LEVEL": "info",
            **(settings or {}),
        }
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = self.root / "service.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def start(self, require_healthy: bool = True) -> Service:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SANDBOX_")}
        env.update(self.settings)
        # the execbox of this checkout, not whichever one the virtualenv has installed
        env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(REPO_ROOT), env.get("PYTHONPATH"))))
        self.port = free_port()
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "execbox.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port)],
                cwd=self.workdir, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"service {self.name} exited with {self.process.returncode} during start-up:\n{self.log_tail()}"
                )
            try:
                response = httpx.get(f"{self.url}/healthz", timeout=2)
            except httpx.TransportError:
                response = None
            if response is not None and (response.status_code == 200 or not require_healthy):
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"service {self.name}: /healthz not ok after {START_TIMEOUT_S:g}s:\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def stop(self, timeout_s: float = 60.0) -> int | None:
        """SIGTERM, wait; SIGKILL if it does not exit. Returns the exit status."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kwargs.pop("timeout", 60.0), **kwargs)


MAX_CODE_SIZE = 64 * 1024
#: SANDBOX_MAX_BODY_SIZE of the main test service
MAX_BODY_SIZE = 1 << 20


def backend_unavailable_reason() -> str | None:
    return _backend_unavailable_reason()
