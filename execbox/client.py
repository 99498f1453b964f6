"""A small Python client for an execbox service (or any service speaking RAGFlow's /run)."""

from __future__ import annotations

import base64
from typing import Any

import httpx

from execbox.models import ExecutionResult, Language
from execbox.wire import result_from_json

__all__ = ["Client"]


def _to_result(data: dict[str, Any]) -> ExecutionResult:
    return result_from_json(data)


class Client:
    """``Client("http://127.0.0.1:9385").run("def main(): return 1")`` -> ExecutionResult."""

    def __init__(self, base_url: str = "http://127.0.0.1:9385", timeout_s: float = 120.0) -> None:
        self._http = httpx.Client(base_url=base_url, timeout=timeout_s)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def healthy(self) -> bool:
        try:
            return self._http.get("/healthz").status_code == 200
        except httpx.HTTPError:
            return False

    def run(self, code: str, language: Language | str = Language.PYTHON, arguments: dict[str, Any] | None = None) -> ExecutionResult:
        """RAGFlow's ``POST /run``."""
        body = {
            "code_b64": base64.b64encode(code.encode()).decode(),
            "language": Language(language).value,
            "arguments": arguments or {},
        }
        response = self._http.post("/run", json=body)
        if response.status_code not in (200, 429):
            response.raise_for_status()
        return _to_result(response.json())

    def execute(self, code: str, language: Language | str = Language.PYTHON, **options: Any) -> ExecutionResult:
        """The native ``POST /v1/execute`` (arguments, stdin, files as bytes, env, limits)."""
        files = {name: base64.b64encode(data).decode() for name, data in (options.pop("files", None) or {}).items()}
        body = {"code": code, "language": Language(language).value, "files": files, **options}
        response = self._http.post("/v1/execute", json=body)
        if response.status_code not in (200, 429):
            response.raise_for_status()
        return _to_result(response.json())
