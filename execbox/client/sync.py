"""The synchronous client: :class:`Client` and its :class:`Session` (see docs/client.md)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Self

import httpx

from execbox.client import calls
from execbox.errors import ExecboxError
from execbox.models import ExecutionResult, Language, SessionFile, SessionInfo

__all__ = ["Client", "Session"]


class Client:
    """A synchronous client: ``Client("http://127.0.0.1:9385").execute("def main(): return 1")``.

    ``api_key`` is sent as ``Authorization: Bearer``; ``transport`` (an httpx transport,
    e.g. ``httpx.MockTransport``) replaces the network. Use it as a context manager, or
    call ``close()``."""

    def __init__(
        self, base_url: str = calls.DEFAULT_URL, *, api_key: str | None = None,
        timeout_s: float = calls.DEFAULT_TIMEOUT_S, headers: Mapping[str, str] | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._http = httpx.Client(
            base_url=base_url, timeout=timeout_s, headers=calls.http_headers(api_key, headers), transport=transport
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _call(self, call: calls.Call) -> Any:
        with calls.translated():
            return calls.answer(call, self._http.send(call.request(self._http)))

    def health(self) -> dict[str, Any]:
        """``GET /healthz``: ``{"status": "ok" | "starting", "backend", "pools", ...}``."""
        return self._call(calls.HEALTH)

    def healthy(self) -> bool:
        """True once the service can run code; False when it is starting or unreachable."""
        try:
            return self.health().get("status") == "ok"
        except ExecboxError:
            return False

    def info(self) -> dict[str, Any]:
        """``GET /v1/info``: backend, default limits, code-check mode, network, pools."""
        return self._call(calls.INFO)

    def run(
        self, code: str, language: Language | str = Language.PYTHON, arguments: Mapping[str, Any] | None = None
    ) -> ExecutionResult:
        """RAGFlow's ``POST /run``: ``code`` defines ``main``, called with ``arguments``."""
        return self._call(calls.run_call(code, language, arguments))

    def execute(
        self, code: str, language: Language | str = Language.PYTHON, *, arguments: Mapping[str, Any] | None = None,
        stdin: str = "", files: calls.FilesArg = None, env: Mapping[str, str] | None = None,
        limits: calls.LimitsArg = None,
    ) -> ExecutionResult:
        """``POST /v1/execute``: ``files`` maps relative paths to their content; ``limits`` is
        a :class:`~execbox.models.Limits` or a dict of some of its fields."""
        return self._call(calls.execute_call(code, language, arguments, stdin, files, env, limits))

    def execute_stream(
        self, code: str, language: Language | str = Language.PYTHON, *, arguments: Mapping[str, Any] | None = None,
        stdin: str = "", files: calls.FilesArg = None, env: Mapping[str, str] | None = None,
        limits: calls.LimitsArg = None,
    ) -> Iterator[calls.StreamEvent]:
        """``POST /v1/execute/stream``: :class:`~execbox.client.OutputEvent` as the program
        prints, then one :class:`~execbox.client.ResultEvent`. Leaving the loop early closes
        the stream (the service then stops the program)."""
        body = calls.execute_body(code, language, arguments, stdin, files, env, limits)
        with calls.translated(), self._http.stream("POST", "/v1/execute/stream", json=body) as response:
            if response.status_code != 200:
                response.read()
                raise calls.error_for(response)
            parser = calls.EventParser()
            for line in response.iter_lines():
                if (event := parser.feed(line)) is not None:
                    yield event
                    if isinstance(event, calls.ResultEvent):
                        return
        raise calls.stream_end()

    def create_session(
        self, language: Language | str = Language.PYTHON, *, limits: calls.LimitsArg = None,
        idle_timeout_s: float | None = None, env: Mapping[str, str] | None = None,
    ) -> Session:
        """``POST /v1/sessions``: a session whose interpreter keeps its names between cells."""
        return Session(self, self._call(calls.create_session_call(language, limits, idle_timeout_s, env)))

    def session(self, session_id: str) -> Session:
        """A live session by its id (NotFoundError if it is unknown, closed or expired)."""
        return Session(self, self._call(calls.describe_call(session_id)))

    def list_sessions(self) -> list[SessionInfo]:
        """``GET /v1/sessions``: the live sessions (only the caller's when API keys are on)."""
        return self._call(calls.SESSIONS)


class Session(calls.SessionHandle):
    """A live session of a :class:`Client`; a context manager that closes it on exit."""

    _client: Client

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def execute(self, code: str, *, stdin: str = "", timeout_s: float | None = None) -> ExecutionResult:
        """Run one cell: earlier cells' names are visible; ``result`` is the last expression's value."""
        return self._client._call(calls.cell_call(self.id, code, stdin, timeout_s))

    def upload(self, path: str, data: bytes | str) -> SessionFile:
        """Write ``data`` to ``path`` (relative to the session's workspace)."""
        return self._client._call(calls.upload_call(self.id, path, data))

    def download(self, path: str) -> bytes:
        """The content of the file at ``path`` in the workspace."""
        return self._client._call(calls.download_call(self.id, path))

    def files(self) -> list[SessionFile]:
        """Every regular file of the workspace, with its size."""
        return self._client._call(calls.files_call(self.id))

    def info(self) -> SessionInfo:
        """The session's description now (executions, last use, expiry)."""
        return self._client._call(calls.describe_call(self.id))

    def close(self) -> None:
        """Delete the session and its sandbox (a session that already ended is no error)."""
        self._client._call(calls.close_call(self.id))
