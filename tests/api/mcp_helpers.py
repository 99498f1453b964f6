"""Helpers of the MCP tests: the two transports, each driven by the SDK's own client.

* stdio: ``python -m execbox.cli mcp`` spawned by the SDK's stdio client, with the
  environment of an api_helpers.Service (clean ``SANDBOX_*``, its own state directory and
  uids) and this checkout on PYTHONPATH;
* streamable HTTP: a FastAPI app that routes /mcp to execbox.api.mcp's ASGI app and runs
  its lifespan inside its own (as the service does), served by a real uvicorn on a
  loopback port.

An MCP client is an anyio task group that must be entered and left by one task, so each
connection is held by one task on a loop thread (:class:`Connection`); the tests call it
synchronously.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx2
import uvicorn
from fastapi import FastAPI
from mcp import Client
from mcp.client.stdio import StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from starlette.requests import Request

from execbox.api.mcp import MCP_PATH, build_mcp, mcp_http_app
from execbox.service.executor import Executor
from execbox.service.sessions import SessionManager
from execbox.settings import Settings

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[2]


def stdio_server(env: dict[str, str], cwd: Path) -> StdioServerParameters:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SANDBOX_")}
    clean["PYTHONPATH"] = f"{REPO}{os.pathsep}{clean.get('PYTHONPATH', '')}"
    return StdioServerParameters(
        command=sys.executable, args=["-m", "execbox.cli", "mcp", "--pool-size", "1"], env={**clean, **env}, cwd=cwd
    )


def service_app(settings: Settings, owner_of: Callable[[Request | None], str | None] | None = None) -> FastAPI:
    """What the HTTP service does to serve MCP: build, route /mcp, run the lifespans nested."""
    executor = Executor(settings, pool_size=1)
    sessions = SessionManager(settings, executor)
    mcp_http = mcp_http_app(build_mcp(settings, executor, sessions, owner_of=owner_of), settings)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async with executor:
            await sessions.start()
            try:
                async with mcp_http.lifespan():
                    yield
            finally:
                await sessions.close()

    app = FastAPI(lifespan=lifespan)
    app.router.add_route(MCP_PATH, mcp_http.asgi, include_in_schema=False)
    return app


class Connection:
    """One MCP client connection (``server`` as mcp.Client takes it; a URL may come with
    ``headers`` for every request), held open by one task on a loop thread;
    ``call(lambda client: client.call_tool(...))`` runs on it."""

    def __init__(self, server: Any, loop: asyncio.AbstractEventLoop, headers: dict[str, str] | None = None) -> None:
        self.loop = loop
        self._server = server
        self._headers = headers
        self._client: Client | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._holder = asyncio.run_coroutine_threadsafe(self._hold(), loop)

    async def _hold(self) -> None:
        self._stop = asyncio.Event()
        try:
            async with contextlib.AsyncExitStack() as stack:
                server = self._server
                if self._headers is not None:
                    timeout = httpx2.Timeout(30.0, read=300.0)  # the SDK's own client's
                    http = await stack.enter_async_context(httpx2.AsyncClient(headers=self._headers, timeout=timeout))
                    server = streamable_http_client(self._server, http_client=http)
                client = await stack.enter_async_context(Client(server, read_timeout_seconds=120))
                self._client = client
                self._ready.set()
                await self._stop.wait()
        except BaseException as exc:
            self._error = exc
            raise
        finally:
            self._ready.set()

    def wait_connected(self, timeout_s: float) -> None:
        if not self._ready.wait(timeout_s) or self._client is None:
            raise RuntimeError(f"no MCP connection within {timeout_s:g}s: {self._error!r}")

    def call(self, work: Callable[[Client], Awaitable[T]], timeout_s: float = 180.0) -> T:
        assert self._client is not None
        return asyncio.run_coroutine_threadsafe(work(self._client), self.loop).result(timeout_s)  # type: ignore[arg-type]

    def close(self, timeout_s: float = 60.0) -> None:
        if self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        with contextlib.suppress(BaseException):
            self._holder.result(timeout_s)


class UvicornThread:
    """A real uvicorn server for ``app`` on a loopback port, run as a task of ``loop``."""

    def __init__(self, app: FastAPI, port: int, loop: asyncio.AbstractEventLoop) -> None:
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.url = f"http://127.0.0.1:{port}{MCP_PATH}"
        self._task = asyncio.run_coroutine_threadsafe(self.server.serve(), loop)

    def wait_started(self, timeout_s: float) -> None:
        deadline = threading.Event()
        for _ in range(int(timeout_s * 10)):
            if self.server.started:
                return
            if self._task.done():
                raise RuntimeError(f"uvicorn stopped during start-up: {self._task.exception()!r}")
            deadline.wait(0.1)
        raise RuntimeError(f"uvicorn did not start within {timeout_s:g}s")

    def stop(self, timeout_s: float = 60.0) -> None:
        self.server.should_exit = True
        with contextlib.suppress(BaseException):
            self._task.result(timeout_s)
