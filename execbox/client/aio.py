"""The asyncio client: :class:`AsyncClient` and its :class:`AsyncSession` (see docs/client.md)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any, Self

import httpx

from execbox.client import calls
from execbox.errors import ExecboxError
from execbox.models import ExecutionResult, Language, SessionFile, SessionInfo

__all__ = ["AsyncClient", "AsyncSession"]


class AsyncClient:
    """The asyncio twin of :class:`Client`: the same methods, awaited (``execute_stream`` is
    an async iterator); ``async with AsyncClient(url) as client: ...``."""

    def __init__(
        self, base_url: str = calls.DEFAULT_URL, *, api_key: str | None = None,
        timeout_s: float = calls.DEFAULT_TIMEOUT_S, headers: Mapping[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._http = httpx.AsyncClient(
            base_url=base_url, timeout=timeout_s, headers=calls.http_headers(api_key, headers), transport=transport
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def _call(self, call: calls.Call) -> Any:
        with calls.translated():
            return calls.answer(call, await self._http.send(call.request(self._http)))

    async def health(self) -> dict[str, Any]:
        """``GET /healthz`` (see :meth:`Client.health`)."""
        return await self._call(calls.HEALTH)

    async def healthy(self) -> bool:
        """True once the service can run code; False when it is starting or unreachable."""
        try:
            return (await self.health()).get("status") == "ok"
        except ExecboxError:
            return False

    async def info(self) -> dict[str, Any]:
        """``GET /v1/info``."""
        return await self._call(calls.INFO)

    async def run(
        self, code: str, language: Language | str = Language.PYTHON, arguments: Mapping[str, Any] | None = None
    ) -> ExecutionResult:
        """RAGFlow's ``POST /run`` (see :meth:`Client.run`)."""
        return await self._call(calls.run_call(code, language, arguments))

    async def execute(
        self, code: str, language: Language | str = Language.PYTHON, *, arguments: Mapping[str, Any] | None = None,
        stdin: str = "", files: calls.FilesArg = None, env: Mapping[str, str] | None = None,
        limits: calls.LimitsArg = None,
    ) -> ExecutionResult:
        """``POST /v1/execute`` (see :meth:`Client.execute`)."""
        return await self._call(calls.execute_call(code, language, arguments, stdin, files, env, limits))

    async def execute_stream(
        self, code: str, language: Language | str = Language.PYTHON, *, arguments: Mapping[str, Any] | None = None,
        stdin: str = "", files: calls.FilesArg = None, env: Mapping[str, str] | None = None,
        limits: calls.LimitsArg = None,
    ) -> AsyncIterator[calls.StreamEvent]:
        """``POST /v1/execute/stream`` (see :meth:`Client.execute_stream`)."""
        body = calls.execute_body(code, language, arguments, stdin, files, env, limits)
        with calls.translated():
            async with self._http.stream("POST", "/v1/execute/stream", json=body) as response:
                if response.status_code != 200:
                    await response.aread()
                    raise calls.error_for(response)
                parser = calls.EventParser()
                async for line in response.aiter_lines():
                    if (event := parser.feed(line)) is not None:
                        yield event
                        if isinstance(event, calls.ResultEvent):
                            return
        raise calls.stream_end()

    async def create_session(
        self, language: Language | str = Language.PYTHON, *, limits: calls.LimitsArg = None,
        idle_timeout_s: float | None = None, env: Mapping[str, str] | None = None,
    ) -> AsyncSession:
        """``POST /v1/sessions`` (see :meth:`Client.create_session`)."""
        return AsyncSession(self, await self._call(calls.create_session_call(language, limits, idle_timeout_s, env)))

    async def session(self, session_id: str) -> AsyncSession:
        """A live session by its id (NotFoundError if it is unknown, closed or expired)."""
        return AsyncSession(self, await self._call(calls.describe_call(session_id)))

    async def list_sessions(self) -> list[SessionInfo]:
        """``GET /v1/sessions``."""
        return await self._call(calls.SESSIONS)


class AsyncSession(calls.SessionHandle):
    """A live session of an :class:`AsyncClient`; ``async with`` closes it on exit."""

    _client: AsyncClient

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def execute(self, code: str, *, stdin: str = "", timeout_s: float | None = None) -> ExecutionResult:
        """Run one cell (see :meth:`Session.execute`)."""
        return await self._client._call(calls.cell_call(self.id, code, stdin, timeout_s))

    async def upload(self, path: str, data: bytes | str) -> SessionFile:
        """Write ``data`` to ``path`` in the workspace."""
        return await self._client._call(calls.upload_call(self.id, path, data))

    async def download(self, path: str) -> bytes:
        """The content of the file at ``path`` in the workspace."""
        return await self._client._call(calls.download_call(self.id, path))

    async def files(self) -> list[SessionFile]:
        """Every regular file of the workspace, with its size."""
        return await self._client._call(calls.files_call(self.id))

    async def info(self) -> SessionInfo:
        """The session's description now."""
        return await self._client._call(calls.describe_call(self.id))

    async def close(self) -> None:
        """Delete the session and its sandbox (a session that already ended is no error)."""
        await self._client._call(calls.close_call(self.id))
