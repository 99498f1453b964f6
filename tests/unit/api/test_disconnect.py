"""A client that goes away stops its run: ``/run``, ``/v1/execute`` and the event stream.

The app is driven as ASGI directly: the request body, then ``http.disconnect`` while the
program still runs. The test backend's program runs until it is aborted, so only the
service's reaction to the disconnect can end it.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from pathlib import Path
from typing import Any, ClassVar

import pytest

from execbox.api.app import create_app
from execbox.isolation.base import (
    IsolationBackend,
    OutputSink,
    RunOutcome,
    Sandbox,
    SandboxSpec,
)
from execbox.models import ExecutionRequest, Limits
from execbox.service.executor import Executor
from execbox.settings import Settings


class HangingSandbox(Sandbox):
    """Not a sandbox: its "program" prints one line, then waits until it is aborted (tests only)."""

    backend_name = "hanging-nonisolating-test-backend"
    #: the sandboxes whose program started, and those that were aborted
    started: ClassVar[list[str]] = []
    aborted: ClassVar[list[str]] = []

    def __init__(self, spec: SandboxSpec, sandbox_id: str) -> None:
        super().__init__(spec, sandbox_id)
        self._stop = threading.Event()

    def run(self, request: ExecutionRequest, limits: Limits, on_output: OutputSink | None = None) -> RunOutcome:
        HangingSandbox.started.append(self.id)
        if on_output is not None:
            on_output("stdout", b"started\n")
        self._stop.wait(limits.wall_time_s)
        return RunOutcome(stdout=b"started\n", stderr=b"", report=None, exit_code=None, signal=9, wall_time_ms=1.0)

    def abort(self) -> None:
        HangingSandbox.aborted.append(self.id)
        self._stop.set()

    def open_workspace(self) -> int:
        raise OSError("no workspace")

    def alive(self) -> bool:
        return True

    def destroy(self) -> None:
        self._stop.set()


class HangingBackend(IsolationBackend):
    name = "hanging-nonisolating-test-backend"

    def check(self) -> None:
        pass

    def create(self, spec: SandboxSpec) -> Sandbox:
        return HangingSandbox(spec, os.urandom(4).hex())

    def reap(self) -> int:
        return 0


async def _call(app: Any, path: str, body: dict[str, Any], disconnect_after: asyncio.Event) -> list[dict[str, Any]]:
    """One POST; the client disconnects once ``disconnect_after`` is set. Returns what was sent."""
    raw = json.dumps(body).encode()
    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())],
        "client": ("127.0.0.1", 1234), "server": ("127.0.0.1", 9385),
    }
    sent: list[dict[str, Any]] = []
    messages = [{"type": "http.request", "body": raw, "more_body": False}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        await disconnect_after.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


@pytest.mark.parametrize("path", ["/run", "/v1/execute", "/v1/execute/stream"])
def test_a_client_going_away_stops_the_program(tmp_path: Path, path: str) -> None:
    for runtime in ("python", "nodejs"):
        (tmp_path / "runtimes" / runtime).mkdir(parents=True)
    settings = Settings.load(env_file=None, code_check="off", state_dir=tmp_path, timeout="60s")
    executor = Executor(settings, backend=HangingBackend(), pool_size=1)
    app = create_app(settings, executor)
    body: dict[str, Any] = {"code_b64": "eA=="} if path == "/run" else {"code": "x"}
    HangingSandbox.started.clear()
    HangingSandbox.aborted.clear()

    async def scenario() -> None:
        async with app.router.lifespan_context(app):
            gone = asyncio.Event()
            call = asyncio.ensure_future(_call(app, path, body, gone))
            # the program runs (a leased sandbox is not enough: a request cancelled while its
            # lease is being handed over gives the sandbox back unused, with nothing to abort)
            while not HangingSandbox.started:
                await asyncio.sleep(0.01)
            gone.set()
            await asyncio.wait_for(call, 30)  # far below the 60 s limit: the disconnect ended it
            assert len(HangingSandbox.aborted) == 1
            while sum(s.leased for s in executor.pool_stats()):  # its sandbox is given back
                await asyncio.sleep(0.01)

    asyncio.run(scenario())
