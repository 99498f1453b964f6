"""The HTTP contract in-process, against a non-isolating test backend (no root needed).

``ScriptedBackend`` runs nothing: the "code" of a request is a JSON description of what
the program did (its output, what main returned, the files it left in artifacts/), and the
sandbox hands that to the real classify/executor/API stack. So these tests check what the
service answers for a program's behaviour (issue 9, findings 1 and 4), whatever backend.
"""

from __future__ import annotations

import base64
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from execbox.api.app import create_app
from execbox.isolation.base import (
    DriverReport,
    IsolationBackend,
    OutputSink,
    RunOutcome,
    Sandbox,
    SandboxSpec,
)
from execbox.models import ExecutionRequest, Limits
from execbox.service.executor import Executor
from execbox.settings import Settings


class ScriptedSandbox(Sandbox):
    """Not a sandbox: replays the outcome its request describes (tests only)."""

    backend_name = "scripted-nonisolating-test-backend"

    def __init__(self, spec: SandboxSpec, sandbox_id: str) -> None:
        super().__init__(spec, sandbox_id)
        self._workspace = Path(tempfile.mkdtemp(prefix="execbox-scripted-"))
        (self._workspace / "artifacts").mkdir()

    def run(self, request: ExecutionRequest, limits: Limits, on_output: OutputSink | None = None) -> RunOutcome:
        script = json.loads(request.code)
        stdout = script.get("stdout", "").encode("utf-8", "surrogatepass")
        if on_output is not None and stdout:
            on_output("stdout", stdout)
        for name_hex, content in script.get("artifacts", {}).items():
            path = os.path.join(os.fsencode(self._workspace / "artifacts"), bytes.fromhex(name_hex))
            with open(path, "wb") as fh:
                fh.write(content.encode())
        value = script.get("value")
        if "deep" in script:  # a list nested that deep (JSON text that deep would not parse here)
            for _ in range(script["deep"]):
                value = [value]
        report = DriverReport(0, {"present": True, "value": value}, None, 1.0)
        return RunOutcome(stdout=stdout, stderr=b"", report=report, exit_code=None, signal=None, wall_time_ms=2.0)

    def open_workspace(self) -> int:
        return os.open(self._workspace, os.O_RDONLY | os.O_DIRECTORY)

    def alive(self) -> bool:
        return True

    def destroy(self) -> None:
        import shutil

        shutil.rmtree(self._workspace, ignore_errors=True)


class ScriptedBackend(IsolationBackend):
    name = "scripted-nonisolating-test-backend"

    def check(self) -> None:
        pass

    def create(self, spec: SandboxSpec) -> Sandbox:
        return ScriptedSandbox(spec, os.urandom(4).hex())

    def reap(self) -> int:
        return 0


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.upper().startswith("SANDBOX_")}
    state = Path(tempfile.mkdtemp(prefix="execbox-inprocess-"))
    for runtime in ("python", "nodejs"):
        (state / "runtimes" / runtime).mkdir(parents=True)
    settings = Settings.load(
        env_file=None, code_check="off", state_dir=state, body_timeout="2s", max_code_size="64k", max_body_size="1m"
    )
    executor = Executor(settings, backend=ScriptedBackend(), pool_size=1)
    try:
        with TestClient(create_app(settings, executor)) as http:
            yield http
    finally:
        os.environ.update(saved)


def program(**script: Any) -> str:
    return json.dumps(script)


# -- finding 1: nothing a program returns makes the service answer 500 -----------------

PROGRAMS = {
    "lone surrogate returned": (program(value="a\ud800b"), "success"),
    "lone surrogate as a key": (program(value={"\udfff": 1}), "success"),
    "lone surrogate printed": (program(stdout="x\ud800", value=1), "success"),
    "nested 800 deep": (program(deep=800, value=1), "program_error"),
    "nested 5000 deep": (program(deep=5000, value=1), "program_error"),
    "artifact name not UTF-8": (program(value=1, artifacts={b"bad\xff.png".hex(): "png"}), "success"),
}


def _answer(client: TestClient, endpoint: str, code: str) -> dict[str, Any]:
    if endpoint == "/run":
        response = client.post("/run", json={"code_b64": base64.b64encode(code.encode()).decode()})
    else:
        response = client.post(endpoint, json={"code": code})
    assert response.status_code == 200, response.text[:500]
    if endpoint.endswith("/stream"):
        events = [block for block in response.text.split("\n\n") if block.startswith("event: result")]
        assert len(events) == 1, response.text[:500]
        return json.loads(events[0].split("data: ", 1)[1])
    return response.json()


@pytest.mark.parametrize("endpoint", ["/run", "/v1/execute", "/v1/execute/stream"])
@pytest.mark.parametrize("case", list(PROGRAMS))
def test_what_a_program_returns_is_a_verdict_never_a_500(client: TestClient, endpoint: str, case: str) -> None:
    code, status = PROGRAMS[case]
    body = _answer(client, endpoint, code)
    assert body["status"] == status, body
    text = json.dumps(body, ensure_ascii=False)
    text.encode("utf-8")  # valid Unicode all the way through
    if status == "program_error":
        assert body["detail"] == "invalid_result"
        assert "deeper than" in body["stderr"]
    if case.startswith("lone surrogate returned"):
        assert body["result"]["value"] == "a\ufffdb"  # replaced, as documented
    if case == "artifact name not UTF-8":
        assert body["artifacts"] == []
        if endpoint != "/run":
            assert body["artifacts_skipped"] == [{"name": "bad\ufffd.png", "reason": "the file name is not valid UTF-8"}]
        else:
            assert "artifacts_skipped" not in body  # /run keeps RAGFlow's fields


def test_nan_and_infinity_become_null(client: TestClient) -> None:
    body = _answer(client, "/v1/execute", '{"value": [NaN, Infinity, -Infinity, 1.5]}')
    assert body["result"]["value"] == [None, None, None, 1.5]


# -- finding 4: strict input, every refusal a 422 whose detail is a list naming the field ----


def assert_422(response: Any, field: str | None = None) -> list[dict[str, Any]]:
    assert response.status_code == 422, response.text[:500]
    detail = response.json()["detail"]
    assert isinstance(detail, list) and detail, detail
    if field is not None:
        assert any(field in [str(part) for part in error["loc"]] for error in detail), detail
    return detail


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b'{"code": ', "JSON"),
        (b'{"code": "\xff\xfe"}', "UTF-8"),
        (b"[" * 5000 + b"]" * 5000, "deeper"),
        (b'{"code": "x", "arguments": {"n": ' + b"9" * 5000 + b"}}", "digits"),
        (b'{"code": "x", "arguments": {"n": NaN}}', "NaN"),
    ],
)
@pytest.mark.parametrize("endpoint", ["/run", "/v1/execute", "/v1/execute/stream"])
def test_undecodable_bodies_are_422(client: TestClient, endpoint: str, raw: bytes, why: str) -> None:
    detail = assert_422(client.post(endpoint, content=raw, headers={"content-type": "application/json"}))
    assert why in json.dumps(detail), detail


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"code": "x", "env": {"A=B": "1"}}, "env"),
        ({"code": "x", "env": {"": "1"}}, "env"),
        ({"code": "x", "env": {"A\u0000": "1"}}, "env"),
        ({"code": "x", "env": {"A": "1\u00002"}}, "env"),
        ({"code": "x", "files": {".": "eA=="}}, "files"),
        ({"code": "x", "files": {"./": "eA=="}}, "files"),
        ({"code": "x", "files": {"a\u0000b": "eA=="}}, "files"),
        ({"code": "x", "files": {"a": "eA==", "a/b": "eA=="}}, "files"),
        ({"code": "x", "files": {"artifacts": "eA=="}}, "files"),
        ({"code": "x\ud800"}, "code"),
        ({"code": "x", "stdin": "\udc80"}, "stdin"),
        ({"code": "x", "limits": {"memory_bytes": 1}}, "memory_bytes"),
        ({"code": "x", "limits": {"memory_bytes": (16 << 20) - 1}}, "memory_bytes"),
        ({"code": "x", "limits": {"wall_time_s": 0}}, "wall_time_s"),
        ({"code": "x", "limits": {"output_bytes": 0}}, "output_bytes"),
        ({"code": "x", "limits": {"wall_time_s": 3600}}, "limits"),  # above the server's maximum
        ({"code": "x", "egress": ["example.org"]}, "egress"),  # this server allows no network
        ({"code": "x", "egress": ["a.*.example.org"]}, "egress"),
    ],
)
@pytest.mark.parametrize("endpoint", ["/v1/execute", "/v1/execute/stream"])
def test_bad_fields_are_422_naming_the_field(client: TestClient, endpoint: str, body: dict[str, Any], field: str) -> None:
    raw = json.dumps(body).encode()  # json.dumps escapes lone surrogates, as a client would send them
    assert_422(client.post(endpoint, content=raw, headers={"content-type": "application/json"}), field)


def test_oversize_chunked_body_is_413(client: TestClient) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"code": "'
        for _ in range(50):
            yield b"x" * (1 << 20)
        yield b'"}'

    response = client.post("/v1/execute", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413, response.text[:300]


def test_openapi_says_422_detail_is_a_list(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    validation = schema["components"]["schemas"]["HTTPValidationError"]
    assert validation["properties"]["detail"]["type"] == "array"
    assert "artifacts_skipped" in schema["components"]["schemas"]["ExecuteResponse"]["properties"]
    assert "artifacts_skipped" not in schema["components"]["schemas"]["RunResponse"]["properties"]


def test_the_library_executor_takes_code_with_a_lone_surrogate(tmp_path: Path) -> None:
    import asyncio

    for runtime in ("python", "nodejs"):
        (tmp_path / "runtimes" / runtime).mkdir(parents=True)
    settings = Settings.load(env_file=None, code_check="off", state_dir=tmp_path)

    async def once() -> Any:
        async with Executor(settings, backend=ScriptedBackend(), pool_size=1) as executor:
            return await executor.execute(ExecutionRequest(code='{"value": "\ud800"}'))

    result = asyncio.run(once())
    assert result.status.value == "success"
    assert result.result is not None and result.result.value == "\ufffd"


def test_a_request_may_turn_egress_off(client: TestClient) -> None:
    response = client.post("/v1/execute", json={"code": program(value=1), "egress": []})
    assert response.status_code == 200, response.text[:300]
    assert response.json()["result"] == {"present": True, "value": 1, "type": "json"}
