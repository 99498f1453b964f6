"""The HTTP calls of the execbox client, shared by ``Client`` and ``AsyncClient``.

Each call is built here as a :class:`Call` (method, path, body, the statuses that are an
answer, how to read it); the two clients only send it. Answers are parsed into typed
models (results by execbox.wire, the one place for result <-> JSON); refusals become
execbox exceptions carrying the service's own message (:func:`error_for`); httpx's own
exceptions are translated at one edge (:func:`translated`); the server-sent events of
``/v1/execute/stream`` are read by :class:`EventParser`.
"""

from __future__ import annotations

import base64
import contextlib
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ConfigDict

from execbox import errors
from execbox.errors import ExecboxError, ServiceError
from execbox.models import ExecutionResult, Language, Limits, SessionFile, SessionInfo
from execbox.wire import result_from_json

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "DEFAULT_URL",
    "HEALTH",
    "INFO",
    "SESSIONS",
    "Call",
    "EventParser",
    "FilesArg",
    "LimitsArg",
    "OutputEvent",
    "ResultEvent",
    "SessionHandle",
    "StreamEvent",
    "answer",
    "cell_call",
    "close_call",
    "create_session_call",
    "describe_call",
    "download_call",
    "error_for",
    "execute_body",
    "execute_call",
    "files_call",
    "http_headers",
    "run_call",
    "stream_end",
    "translated",
    "upload_call",
]

DEFAULT_URL = "http://127.0.0.1:9385"
#: long enough for an execution at the service's largest time limit, plus its queueing
DEFAULT_TIMEOUT_S = 120.0


class OutputEvent(BaseModel):
    """Text the program printed, as it printed it (``/v1/execute/stream``)."""

    model_config = ConfigDict(frozen=True)

    stream: Literal["stdout", "stderr"]
    text: str


class ResultEvent(BaseModel):
    """The last event of a stream: the verdict, which also holds the whole output."""

    model_config = ConfigDict(frozen=True)

    result: ExecutionResult


StreamEvent = OutputEvent | ResultEvent

LimitsArg = Limits | Mapping[str, float | int] | None
FilesArg = Mapping[str, bytes | str] | None


# ---------------------------------------------------------------- the calls, shared by both clients


@dataclass(frozen=True)
class Call:
    """One request and how to read its answer (``read`` gets a response of an ``ok`` status)."""

    method: str
    path: str
    read: Callable[[httpx.Response], Any]
    json: Any = None
    content: bytes | None = None
    ok: tuple[int, ...] = (200,)

    def request(self, http: httpx.Client | httpx.AsyncClient) -> httpx.Request:
        return http.build_request(self.method, self.path, json=self.json, content=self.content)


def _language(language: Language | str) -> str:
    try:
        return Language(language).value
    except ValueError:
        return str(language)  # the service says what it accepts, in its own words


def _limits_json(limits: LimitsArg) -> dict[str, Any] | None:
    if limits is None:
        return None
    if isinstance(limits, Limits):
        return limits.model_dump(exclude_none=True)
    return dict(limits)


def _files_json(files: FilesArg) -> dict[str, str]:
    return {
        name: base64.b64encode(data.encode() if isinstance(data, str) else bytes(data)).decode("ascii")
        for name, data in (files or {}).items()
    }


def _without_none(body: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in body.items() if value is not None}


def session_path(session_id: str, *rest: str) -> str:
    return "/".join(("/v1/sessions", quote(session_id, safe=""), *rest))


def file_path(session_id: str, path: str) -> str:
    # each segment quoted; "." and ".." too, so that the service (not URL normalisation) refuses them
    segments = [quote(s, safe="") if s not in (".", "..") else s.replace(".", "%2E") for s in path.split("/")]
    return session_path(session_id, "files", "/".join(segments))


def _json_body(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError as exc:
        raise ServiceError(
            f"{response.request.method} {response.request.url.path}: the answer (HTTP {response.status_code}) "
            f"is not JSON: {response.text[:200]!r}", response.status_code,
        ) from exc


def read_result(response: httpx.Response) -> ExecutionResult:
    data = _json_body(response)
    try:
        return result_from_json(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise ServiceError(f"the answer is not an execution result: {exc}", response.status_code) from exc


def _epoch_s(value: Any) -> Any:
    """A time of the wire (ISO 8601, UTC) as SessionInfo holds it: seconds since the epoch."""
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value).timestamp()
        except ValueError:
            return value  # left for SessionInfo to refuse, naming the field
    return value


def _session_info(data: Mapping[str, Any]) -> SessionInfo:
    known = {k: v for k, v in data.items() if k in SessionInfo.model_fields}
    known.setdefault("last_used_at", data.get("created_at"))  # the answer of create has no use yet
    for name in ("created_at", "expires_at", "last_used_at"):
        known[name] = _epoch_s(known.get(name))
    try:
        return SessionInfo.model_validate(known)
    except ValueError as exc:
        raise ServiceError(f"the answer is not a session's description: {exc}") from exc


def _read_session(response: httpx.Response) -> SessionInfo:
    return _session_info(_json_body(response))


def _read_sessions(response: httpx.Response) -> list[SessionInfo]:
    return [_session_info(item) for item in _json_body(response)["sessions"]]


def _read_file(response: httpx.Response) -> SessionFile:
    data = _json_body(response)
    return SessionFile(path=data["path"], size=data["size"])


def _read_files(response: httpx.Response) -> list[SessionFile]:
    return [SessionFile(path=f["path"], size=f["size"]) for f in _json_body(response)["files"]]


def run_call(code: str, language: Language | str, arguments: Mapping[str, Any] | None) -> Call:
    body = {"code_b64": base64.b64encode(code.encode()).decode("ascii"), "language": _language(language),
            "arguments": dict(arguments or {})}
    # RAGFlow's contract: a rate-limited /run is a verdict (-429), not an error
    return Call("POST", "/run", read_result, json=body, ok=(200, 429))


def execute_body(
    code: str, language: Language | str, arguments: Mapping[str, Any] | None, stdin: str, files: FilesArg,
    env: Mapping[str, str] | None, limits: LimitsArg,
) -> dict[str, Any]:
    return _without_none({
        "code": code, "language": _language(language), "arguments": dict(arguments or {}), "stdin": stdin,
        "files": _files_json(files), "env": dict(env or {}), "limits": _limits_json(limits),
    })


def execute_call(*args: Any) -> Call:
    return Call("POST", "/v1/execute", read_result, json=execute_body(*args))


def create_session_call(
    language: Language | str, limits: LimitsArg, idle_timeout_s: float | None, env: Mapping[str, str] | None
) -> Call:
    body = _without_none({"language": _language(language), "limits": _limits_json(limits),
                          "idle_timeout_s": idle_timeout_s, "env": dict(env) if env else None})
    return Call("POST", "/v1/sessions", _read_session, json=body, ok=(201, 200))


def cell_call(session_id: str, code: str, stdin: str, timeout_s: float | None) -> Call:
    body = _without_none({"code": code, "stdin": stdin or None, "timeout_s": timeout_s})
    return Call("POST", session_path(session_id, "execute"), read_result, json=body)


def describe_call(session_id: str) -> Call:
    return Call("GET", session_path(session_id), _read_session)


def upload_call(session_id: str, path: str, data: bytes | str) -> Call:
    content = data.encode() if isinstance(data, str) else bytes(data)
    return Call("PUT", file_path(session_id, path), _read_file, content=content, ok=(201, 200))


def download_call(session_id: str, path: str) -> Call:
    return Call("GET", file_path(session_id, path), lambda response: response.content)


def files_call(session_id: str) -> Call:
    return Call("GET", session_path(session_id, "files"), _read_files)


def close_call(session_id: str) -> Call:
    # closing a session that already ended (closed, expired, its interpreter killed) is not an error
    return Call("DELETE", session_path(session_id), lambda _: None, ok=(204, 200, 404))


def _health(response: httpx.Response) -> dict[str, Any]:
    return dict(_json_body(response))


HEALTH = Call("GET", "/healthz", _health, ok=(200, 503))  # 503: up, no sandbox ready yet
INFO = Call("GET", "/v1/info", _health)
SESSIONS = Call("GET", "/v1/sessions", _read_sessions)


# ---------------------------------------------------------------- errors


def _detail(response: httpx.Response) -> str:
    """The service's own message: FastAPI's ``detail`` (a string, or a list of field errors)."""
    try:
        data = response.json()
    except ValueError:
        return response.text.strip() or response.reason_phrase
    detail = data.get("detail") if isinstance(data, dict) else None
    if isinstance(detail, list):
        parts = []
        for item in detail:
            if isinstance(item, dict):
                where = ".".join(str(p) for p in item.get("loc", ()) if p != "body")
                parts.append(f"{where}: {item.get('msg')}" if where else str(item.get("msg")))
            else:
                parts.append(str(item))
        return "; ".join(parts)
    if detail is not None:
        return str(detail)
    if isinstance(data, dict) and isinstance(data.get("stderr"), str) and data["stderr"].strip():
        return data["stderr"].strip()  # a result-shaped refusal (the rate limit)
    return response.text.strip() or response.reason_phrase


def _retry_after_s(response: httpx.Response) -> float:
    try:
        return max(0.0, float(response.headers.get("retry-after", "1")))
    except ValueError:
        return 1.0


def error_for(response: httpx.Response) -> ExecboxError:
    """The execbox exception for a refused request, with the service's message."""
    status = response.status_code
    message = _detail(response)
    where = f"{response.request.method} {response.request.url.path}"
    if status in (400, 413, 422):
        return errors.BadRequestError(message)
    if status == 401 or status == 403:
        return errors.AuthenticationError(f"{where}: {message}")
    if status == 404:
        return errors.NotFoundError(message)
    if status in (429, 503):
        return errors.LimitExceededError(message, retry_after_s=_retry_after_s(response))
    return ServiceError(f"{where}: HTTP {status}: {message}", status)


@contextlib.contextmanager
def translated() -> Iterator[None]:
    """httpx's exceptions as execbox's (a transport failure, a broken answer)."""
    try:
        yield
    except httpx.TransportError as exc:
        raise errors.ServiceUnreachableError(f"{type(exc).__name__}: {exc}") from exc
    except httpx.HTTPError as exc:
        raise ServiceError(f"{type(exc).__name__}: {exc}") from exc


def answer(call: Call, response: httpx.Response) -> Any:
    if response.status_code not in call.ok:
        raise error_for(response)
    return call.read(response)


# ---------------------------------------------------------------- server-sent events


class EventParser:
    """``text/event-stream`` lines -> events (the WHATWG rules: ``event:``/``data:`` fields,
    several ``data:`` lines joined, ``:`` comments, a blank line ends an event)."""

    def __init__(self) -> None:
        self._event = "message"
        self._data: list[str] = []

    def feed(self, line: str) -> StreamEvent | None:
        if line.startswith(":"):
            return None
        if line:
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "event":
                self._event = value
            elif name == "data":
                self._data.append(value)
            return None
        event, data = self._event, "\n".join(self._data)
        self._event, self._data = "message", []
        if not data:
            return None
        if event in ("stdout", "stderr"):
            return OutputEvent(stream=event, text=json.loads(data))
        if event == "result":
            return ResultEvent(result=result_from_json(json.loads(data)))
        if event == "error":
            raise ServiceError(f"the stream ended with an error: {data}")
        return None  # an event this client does not know: skipped


def stream_end() -> ServiceError:
    return ServiceError("the stream ended before its result event")


class SessionHandle:
    """What both session classes hold: their client, and the session's id, language, backend."""

    def __init__(self, client: Any, info: SessionInfo) -> None:
        self._client = client
        self.id = info.id
        self.language = info.language
        self.backend = info.backend

    def __repr__(self) -> str:
        return f"{type(self).__name__}(id={self.id!r}, language={self.language.value!r})"


def http_headers(api_key: str | None, headers: Mapping[str, str] | None) -> dict[str, str]:
    merged = {"user-agent": "execbox-client", **(headers or {})}
    if api_key:
        merged["authorization"] = f"Bearer {api_key}"
    return merged
