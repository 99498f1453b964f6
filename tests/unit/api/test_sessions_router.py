"""The sessions router's HTTP mapping, against a small fake SessionManager (no sandbox).

What is checked here is the wire: status codes, body shapes, validation, the errors of
the manager answered as 404 / 400 / 429 with Retry-After, raw file bytes. The sessions
themselves are tested with the real manager elsewhere.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from execbox.api.app import create_app
from execbox.errors import BadRequestError, LimitExceededError, NotFoundError
from execbox.isolation.base import IsolationBackend, OutputSink
from execbox.models import (
    CellRequest,
    ExecutionResult,
    ResultValue,
    SessionFile,
    SessionInfo,
    SessionRequest,
    Status,
)
from execbox.service.executor import Executor
from execbox.settings import Settings

CREATED_AT = 1_700_000_000.25


class FakeSessions:
    """Keeps what it was asked in memory; ``full`` makes create raise LimitExceededError."""

    def __init__(self) -> None:
        self.sessions: dict[str, SessionInfo] = {}
        self.requests: list[SessionRequest] = []
        self.cells: list[CellRequest] = []
        self.files: dict[tuple[str, str], bytes] = {}
        self.full = False
        self.started = self.closed = False

    async def start(self) -> None:
        self.started = True

    async def close(self) -> None:
        self.closed = True

    def count(self) -> int:
        return len(self.sessions)

    def _get(self, session_id: str, owner: str | None) -> SessionInfo:
        info = self.sessions.get(session_id)
        if info is None or info.owner != owner:
            raise NotFoundError(f"no session {session_id!r}")
        return info

    async def create(self, request: SessionRequest, owner: str | None) -> SessionInfo:
        if self.full:
            raise LimitExceededError("SANDBOX_MAX_SESSIONS (2) sessions are live", retry_after_s=2.5)
        self.requests.append(request)
        info = SessionInfo(
            id=f"s{len(self.sessions) + 1}", language=request.language, backend="fake", created_at=CREATED_AT,
            expires_at=CREATED_AT + 3600, idle_timeout_s=request.idle_timeout_s or 600, last_used_at=CREATED_AT,
            owner=owner,
        )
        self.sessions[info.id] = info
        return info

    async def execute(
        self, session_id: str, cell: CellRequest, owner: str | None, on_output: OutputSink | None = None
    ) -> ExecutionResult:
        info = self._get(session_id, owner)
        self.cells.append(cell)
        self.sessions[session_id] = info.model_copy(update={"executions": info.executions + 1, "last_used_at": CREATED_AT + 5})
        return ExecutionResult(status=Status.SUCCESS, stdout="hi\n", result=ResultValue(present=True, value=2), backend="fake")

    def describe(self, session_id: str, owner: str | None) -> SessionInfo:
        return self._get(session_id, owner)

    def list(self, owner: str | None) -> list[SessionInfo]:
        return [info for info in self.sessions.values() if info.owner == owner]

    async def delete(self, session_id: str, owner: str | None) -> None:
        self._get(session_id, owner)
        del self.sessions[session_id]

    async def put_file(self, session_id: str, path: str, data: bytes, owner: str | None) -> SessionFile:
        self._get(session_id, owner)
        if path.startswith("/") or ".." in path.split("/"):
            raise BadRequestError(f"path {path!r} is outside the workspace")
        self.files[(session_id, path)] = data
        return SessionFile(path=path, size=len(data))

    async def get_file(self, session_id: str, path: str, owner: str | None) -> bytes:
        self._get(session_id, owner)
        try:
            return self.files[(session_id, path)]
        except KeyError:
            raise NotFoundError(f"no file {path!r}") from None

    async def list_files(self, session_id: str, owner: str | None) -> list[SessionFile]:
        self._get(session_id, owner)
        return [SessionFile(path=p, size=len(d)) for (s, p), d in sorted(self.files.items()) if s == session_id]


@pytest.fixture()
def fake() -> FakeSessions:
    return FakeSessions()


@pytest.fixture()
def client(fake: FakeSessions, tmp_path: Path, broken_backend: IsolationBackend) -> Iterator[TestClient]:
    for runtime in ("python", "nodejs"):
        (tmp_path / "runtimes" / runtime).mkdir(parents=True)
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.upper().startswith("SANDBOX_")}
    try:
        settings = Settings.load(env_file=None, state_dir=tmp_path, max_code_size="64k", max_body_size="1m")
        executor = Executor(settings, backend=broken_backend, pool_size=0)  # no sandbox is built
        with TestClient(create_app(settings, executor, sessions=fake)) as http:  # type: ignore[arg-type]
            yield http
    finally:
        os.environ.update(saved)
    assert fake.started and fake.closed


def _iso(value: str) -> datetime:
    assert value.endswith(("Z", "+00:00")), value
    return datetime.fromisoformat(value)


def test_create_answers_201_with_the_description(client: TestClient, fake: FakeSessions) -> None:
    response = client.post("/v1/sessions", json={"language": "nodejs", "idle_timeout_s": 60, "env": {"A": "1"}})
    assert response.status_code == 201, response.text
    body = response.json()
    assert set(body) == {"id", "language", "created_at", "expires_at", "idle_timeout_s", "backend"}
    assert body["language"] == "nodejs" and body["backend"] == "fake" and body["idle_timeout_s"] == 60
    assert _iso(body["created_at"]).timestamp() == CREATED_AT
    assert _iso(body["expires_at"]).timestamp() == CREATED_AT + 3600
    assert fake.requests[0].env == {"A": "1"} and fake.requests[0].limits is None


def test_create_merges_the_limits_over_the_servers(client: TestClient, fake: FakeSessions) -> None:
    response = client.post("/v1/sessions", json={"limits": {"wall_time_s": 2}})
    assert response.status_code == 201, response.text
    limits = fake.requests[0].limits
    assert limits is not None and limits.wall_time_s == 2 and limits.memory_bytes == 256 << 20


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"language": "cobol"}, "language"),
        ({"lang": "python"}, "lang"),
        ({"idle_timeout_s": 0}, "idle_timeout_s"),
        ({"idle_timeout_s": "soon"}, "idle_timeout_s"),
        ({"env": {"A=B": "1"}}, "env"),
        ({"limits": {"memory_bytes": 1}}, "memory_bytes"),
        ({"limits": {"wall_time_s": 3600}}, "limits"),  # above the server's maximum
        ({"limits": {"cpus": 2}}, "cpus"),
    ],
)
def test_create_refuses_bad_bodies_with_422(client: TestClient, fake: FakeSessions, body: dict[str, Any], field: str) -> None:
    response = client.post("/v1/sessions", json=body)
    assert response.status_code == 422, response.text
    assert any(field in map(str, error["loc"]) for error in response.json()["detail"]), response.text
    assert fake.requests == []


def test_above_the_session_cap_is_429_with_retry_after(client: TestClient, fake: FakeSessions) -> None:
    fake.full = True
    response = client.post("/v1/sessions", json={})
    assert response.status_code == 429
    assert response.headers["retry-after"] == "3"
    assert "SANDBOX_MAX_SESSIONS" in response.json()["detail"]


def test_execute_answers_like_v1_execute(client: TestClient, fake: FakeSessions) -> None:
    session = client.post("/v1/sessions", json={}).json()["id"]
    response = client.post(f"/v1/sessions/{session}/execute", json={"code": "x = 1\nx + 1", "stdin": "in", "timeout_s": 1.5})
    assert response.status_code == 200, response.text
    body = response.json()
    from execbox.wire import NATIVE_FIELDS

    assert tuple(body) == NATIVE_FIELDS
    assert body["status"] == "success" and body["stdout"] == "hi\n" and body["result"]["value"] == 2
    assert fake.cells == [CellRequest(code="x = 1\nx + 1", stdin="in", timeout_s=1.5)]


@pytest.mark.parametrize(
    ("body", "field"),
    [({}, "code"), ({"code": "x", "arguments": {}}, "arguments"), ({"code": "x", "timeout_s": -1}, "timeout_s"),
     ({"code": "x\ud800"}, "code")],
)
def test_execute_refuses_bad_cells_with_422(client: TestClient, fake: FakeSessions, body: dict[str, Any], field: str) -> None:
    import json

    session = client.post("/v1/sessions", json={}).json()["id"]
    raw = json.dumps(body).encode()
    response = client.post(f"/v1/sessions/{session}/execute", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    assert any(field in map(str, error["loc"]) for error in response.json()["detail"]), response.text
    assert fake.cells == []


def test_execute_code_over_the_limit_is_413(client: TestClient) -> None:
    session = client.post("/v1/sessions", json={}).json()["id"]
    response = client.post(f"/v1/sessions/{session}/execute", json={"code": "#" * (65 << 10)})
    assert response.status_code == 413


def test_describe_list_and_delete(client: TestClient) -> None:
    first = client.post("/v1/sessions", json={}).json()["id"]
    second = client.post("/v1/sessions", json={"language": "nodejs"}).json()["id"]
    client.post(f"/v1/sessions/{first}/execute", json={"code": "1"})
    described = client.get(f"/v1/sessions/{first}")
    assert described.status_code == 200
    body = described.json()
    assert body["executions"] == 1 and _iso(body["last_used_at"]).timestamp() == CREATED_AT + 5
    assert {"id", "language", "created_at", "expires_at", "idle_timeout_s", "backend"} <= set(body)
    listed = client.get("/v1/sessions").json()
    assert [s["id"] for s in listed["sessions"]] == [first, second]
    deleted = client.delete(f"/v1/sessions/{first}")
    assert deleted.status_code == 204 and deleted.content == b""
    assert [s["id"] for s in client.get("/v1/sessions").json()["sessions"]] == [second]


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", ""), ("DELETE", ""), ("POST", "/execute"), ("GET", "/files"), ("GET", "/files/a.txt"), ("PUT", "/files/a.txt")],
)
def test_unknown_session_is_404_with_a_detail(client: TestClient, method: str, path: str) -> None:
    kwargs: dict[str, Any] = {"json": {"code": "1"}} if path == "/execute" else {}
    response = client.request(method, f"/v1/sessions/nope{path}", **kwargs)
    assert response.status_code == 404, response.text
    assert "nope" in response.json()["detail"]


def test_files_round_trip_as_raw_bytes(client: TestClient) -> None:
    session = client.post("/v1/sessions", json={}).json()["id"]
    data = bytes(range(256)) * 3
    put = client.put(f"/v1/sessions/{session}/files/data/in.bin", content=data)
    assert put.status_code == 201, put.text
    assert put.json() == {"path": "data/in.bin", "size": len(data)}
    got = client.get(f"/v1/sessions/{session}/files/data/in.bin")
    assert got.status_code == 200
    assert got.headers["content-type"] == "application/octet-stream"
    assert got.content == data
    assert client.get(f"/v1/sessions/{session}/files").json() == {"files": [{"path": "data/in.bin", "size": len(data)}]}


def test_a_bad_path_is_400(client: TestClient) -> None:
    session = client.post("/v1/sessions", json={}).json()["id"]
    response = client.put(f"/v1/sessions/{session}/files/a/%2e%2e/%2e%2e/etc/x", content=b"x")  # httpx would fold a plain ..
    assert response.status_code == 400, response.text
    assert "outside" in response.json()["detail"]


def test_an_upload_over_the_body_cap_is_413(client: TestClient, fake: FakeSessions) -> None:
    session = client.post("/v1/sessions", json={}).json()["id"]
    response = client.put(f"/v1/sessions/{session}/files/big.bin", content=b"x" * ((1 << 20) + 1))
    assert response.status_code == 413
    assert fake.files == {}


def test_live_sessions_are_a_metric(client: TestClient) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    def live() -> float:
        families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
        return float(families["execbox_sessions_live"].samples[0].value)

    assert live() == 0
    session = client.post("/v1/sessions", json={}).json()["id"]
    assert live() == 1
    client.delete(f"/v1/sessions/{session}")
    assert live() == 0


def test_openapi_documents_the_session_endpoints(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert set(paths["/v1/sessions"]) == {"get", "post"}
    assert set(paths["/v1/sessions/{session_id}"]) == {"get", "delete"}
    assert "put" in paths["/v1/sessions/{session_id}/files/{path}"]
