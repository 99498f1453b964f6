"""The Python client against httpx.MockTransport: what it sends, how it reads answers, and
how every refusal of the service becomes an execbox exception with the service's message."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from execbox import (
    AsyncClient,
    AuthenticationError,
    BadRequestError,
    Client,
    LimitExceededError,
    Limits,
    NotFoundError,
    OutputEvent,
    ResultEvent,
    ServiceError,
    ServiceUnreachableError,
    Status,
)
from execbox.models import Artifact, ExecutionResult, ResultValue
from execbox.wire import result_to_json

PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe"
RESULT = ExecutionResult(
    status=Status.SUCCESS, stdout="hi\n", result=ResultValue(present=True, value={"n": 1}), backend="namespaces",
    artifacts=(Artifact(name="chart.png", mime_type="image/png", size=len(PNG), content=PNG),),
)
SESSION = {"id": "s-1", "language": "python", "created_at": "1970-01-01T00:00:01Z",
           "expires_at": "1970-01-01T01:00:01.500000Z", "idle_timeout_s": 600.0, "backend": "namespaces"}
Handler = Callable[[httpx.Request], httpx.Response]


def client_for(handler: Handler, **kwargs: Any) -> Client:
    return Client("http://execbox.test", transport=httpx.MockTransport(handler), **kwargs)


def answer(data: Any, status: int = 200, **kwargs: Any) -> httpx.Response:
    return httpx.Response(status, json=data, **kwargs)


class Recorder:
    """A handler that answers ``response`` and keeps the requests it got."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.response

    @property
    def body(self) -> Any:
        return json.loads(self.requests[-1].content)


def test_execute_sends_limits_files_env_and_reads_a_typed_result() -> None:
    handler = Recorder(answer(result_to_json(RESULT, native=True)))
    with client_for(handler) as client:
        result = client.execute(
            "def main(n): return n", arguments={"n": 1}, stdin="in", files={"data/a.bin": b"\x00\xff", "b.txt": "text"},
            env={"A": "1"}, limits=Limits(wall_time_s=2, memory_bytes=64 << 20, output_bytes=1000),
        )
    assert handler.requests[-1].url.path == "/v1/execute"
    body = handler.body
    assert body["limits"] == {"wall_time_s": 2.0, "memory_bytes": 64 << 20, "output_bytes": 1000}
    assert base64.b64decode(body["files"]["data/a.bin"]) == b"\x00\xff"
    assert base64.b64decode(body["files"]["b.txt"]) == b"text"
    assert (body["stdin"], body["env"], body["arguments"], body["language"]) == ("in", {"A": "1"}, {"n": 1}, "python")
    assert result == RESULT
    assert result.artifacts[0].content == PNG


def test_limits_as_a_dict_of_some_fields() -> None:
    handler = Recorder(answer(result_to_json(RESULT, native=True)))
    with client_for(handler) as client:
        client.execute("x", "nodejs", limits={"wall_time_s": 1.5})
    assert handler.body["limits"] == {"wall_time_s": 1.5}
    assert handler.body["language"] == "nodejs"


def test_a_result_with_a_png_dumps_to_json_and_back() -> None:
    text = RESULT.model_dump_json()
    assert json.loads(text)["artifacts"][0]["content"] == base64.b64encode(PNG).decode()
    assert ExecutionResult.model_validate_json(text) == RESULT


def test_run_sends_base64_and_takes_the_rate_limited_verdict() -> None:
    limited = {"status": "program_runner_error", "exit_code": -429, "stdout": "", "stderr": "Too many requests",
               "detail": "Too many requests, please try again later", "artifacts": [], "result": None}
    handler = Recorder(answer(limited, 429))
    with client_for(handler) as client:
        result = client.run("def main(): return 1", "javascript", {"a": 1})
    assert base64.b64decode(handler.body["code_b64"]).decode() == "def main(): return 1"
    assert handler.body["language"] == "nodejs"
    assert result.exit_code == -429 and result.status is Status.PROGRAM_RUNNER_ERROR


def test_api_key_is_sent_as_bearer() -> None:
    handler = Recorder(answer({"status": "ok"}))
    with client_for(handler, api_key="k-123") as client:
        assert client.healthy()
    assert handler.requests[-1].headers["authorization"] == "Bearer k-123"


def test_422_is_bad_request_with_the_servers_message() -> None:
    detail = [{"loc": ["body", "limits"], "msg": "limits above the server's maxima: wall_time_s 3600 > 10",
               "type": "value_error"}]
    with client_for(Recorder(answer({"detail": detail}, 422))) as client:
        with pytest.raises(BadRequestError, match=r"limits: limits above the server's maxima: wall_time_s 3600 > 10"):
            client.execute("x", limits={"wall_time_s": 3600})


@pytest.mark.parametrize(
    ("status", "exception", "headers"),
    [
        (400, BadRequestError, {}),
        (413, BadRequestError, {}),
        (401, AuthenticationError, {}),
        (404, NotFoundError, {}),
        (429, LimitExceededError, {"Retry-After": "7"}),
        (503, LimitExceededError, {"Retry-After": "3"}),
        (500, ServiceError, {}),
    ],
)
def test_status_maps_to_an_execbox_exception(status: int, exception: type[Exception], headers: dict[str, str]) -> None:
    handler = Recorder(answer({"detail": f"the service says {status}"}, status, headers=headers))
    with client_for(handler) as client:
        with pytest.raises(exception, match=f"the service says {status}") as caught:
            client.session("s-1").execute("1")
    if headers:
        assert caught.value.retry_after_s == float(headers["Retry-After"])
    if status == 500:
        assert caught.value.status_code == 500


def test_a_body_that_is_not_json_is_a_service_error() -> None:
    with client_for(lambda _: httpx.Response(200, text="<html>proxy</html>")) as client:
        with pytest.raises(ServiceError, match="not JSON"):
            client.execute("x")


def test_transport_errors_are_service_unreachable() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    with client_for(refuse) as client:
        with pytest.raises(ServiceUnreachableError, match="connection refused"):
            client.info()
        assert client.healthy() is False


def test_sessions_files_and_paths() -> None:
    routes: dict[tuple[str, str], httpx.Response] = {
        ("POST", "/v1/sessions"): answer(SESSION, 201),
        ("POST", "/v1/sessions/s-1/execute"): answer(result_to_json(RESULT, native=True)),
        ("PUT", "/v1/sessions/s-1/files/data/in%20put.csv"): answer({"path": "data/in put.csv", "size": 3}, 201),
        ("GET", "/v1/sessions/s-1/files/data/in%20put.csv"): httpx.Response(200, content=b"a,b"),
        ("GET", "/v1/sessions/s-1/files"): answer({"files": [{"path": "data/in put.csv", "size": 3}]}),
        ("GET", "/v1/sessions/s-1"): answer({**SESSION, "executions": 1, "last_used_at": "1970-01-01T00:00:05Z"}),
        ("GET", "/v1/sessions"): answer({"sessions": [{**SESSION, "executions": 1, "last_used_at": "1970-01-01T00:00:05Z"}]}),
        ("DELETE", "/v1/sessions/s-1"): httpx.Response(204),
    }
    seen: list[tuple[str, str, bytes]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        key = (request.method, request.url.raw_path.decode())
        seen.append((*key, request.content))
        return routes.get(key) or answer({"detail": f"no route {key}"}, 404)

    with client_for(handler) as client:
        with client.create_session("python", idle_timeout_s=60, limits={"wall_time_s": 2}) as session:
            assert (session.id, session.language.value, session.backend) == ("s-1", "python", "namespaces")
            assert session.execute("x = 1\nx").result == RESULT.result
            assert session.upload("data/in put.csv", b"a,b").size == 3
            assert session.download("data/in put.csv") == b"a,b"
            assert [f.path for f in session.files()] == ["data/in put.csv"]
            info = session.info()
            assert (info.executions, info.created_at, info.expires_at, info.last_used_at) == (1, 1.0, 3601.5, 5.0)
            assert [s.id for s in client.list_sessions()] == ["s-1"]
    assert json.loads(seen[0][2]) == {"language": "python", "limits": {"wall_time_s": 2}, "idle_timeout_s": 60}
    assert json.loads(seen[1][2]) == {"code": "x = 1\nx"}
    assert seen[2][2] == b"a,b"
    assert seen[-1][:2] == ("DELETE", "/v1/sessions/s-1"), "the context manager closes the session"


def test_dot_segments_reach_the_service_for_it_to_refuse() -> None:
    paths: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        paths.append(request.url.raw_path.decode())
        if request.url.path == "/v1/sessions/s-1":
            return answer({**SESSION, "last_used_at": SESSION["created_at"]})
        return answer({"detail": "path '../etc/passwd' is outside the workspace"}, 400)

    with client_for(handler) as client:
        with pytest.raises(BadRequestError, match="outside the workspace"):
            client.session("s-1").download("../etc/passwd")
    assert paths[-1] == "/v1/sessions/s-1/files/%2E%2E/etc/passwd", "not normalised away by the client"


def test_closing_a_session_that_already_ended_is_no_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            return answer(SESSION, 201)
        return answer({"detail": "no session s-1"}, 404)

    with client_for(handler) as client:
        session = client.create_session()
        session.close()
        with pytest.raises(NotFoundError, match="no session s-1"):
            session.info()


def sse(*events: tuple[str, Any]) -> bytes:
    parts = [": keep-alive\n\n"]
    for name, data in events:
        parts.append(f"event: {name}\ndata: {json.dumps(data)}\n\n")
    return "".join(parts).encode()


STREAM = sse(("stdout", "line 1\n"), ("stderr", "warn\n"), ("stdout", "é\n"), ("result", result_to_json(RESULT, native=True)))


def test_execute_stream_yields_output_then_the_result() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/execute/stream"
        return httpx.Response(200, content=STREAM, headers={"content-type": "text/event-stream"})

    with client_for(handler) as client:
        events = list(client.execute_stream("def main(): print(1)"))
    assert events[:3] == [
        OutputEvent(stream="stdout", text="line 1\n"), OutputEvent(stream="stderr", text="warn\n"),
        OutputEvent(stream="stdout", text="é\n"),
    ]
    assert events[3] == ResultEvent(result=RESULT)


def test_a_stream_without_its_result_is_a_service_error() -> None:
    body = sse(("stdout", "partial"))
    with client_for(lambda _: httpx.Response(200, content=body)) as client:
        with pytest.raises(ServiceError, match="before its result"):
            list(client.execute_stream("x"))


def test_a_refused_stream_raises_before_any_event() -> None:
    detail = [{"loc": ["body", "language"], "msg": "Input should be 'python' or 'nodejs'", "type": "enum"}]
    with client_for(lambda _: answer({"detail": detail}, 422)) as client:
        with pytest.raises(BadRequestError, match="language: Input should be"):
            list(client.execute_stream("x", "ruby"))


def test_async_client_does_the_same() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/execute/stream":
            return httpx.Response(200, content=STREAM)
        if request.url.path == "/v1/sessions":
            return answer(SESSION, 201)
        if request.url.path == "/v1/sessions/s-1/execute":
            return answer({"detail": "no session s-1"}, 404)
        if request.method == "DELETE":
            return httpx.Response(204)
        return answer(result_to_json(RESULT, native=True))

    async def scenario() -> None:
        async with AsyncClient("http://execbox.test", transport=httpx.MockTransport(handler), api_key="k") as client:
            assert await client.execute("x", limits=Limits(wall_time_s=1, memory_bytes=1 << 26, output_bytes=10)) == RESULT
            events = [event async for event in client.execute_stream("x")]
            assert isinstance(events[-1], ResultEvent) and events[-1].result == RESULT
            assert [e.text for e in events if isinstance(e, OutputEvent)] == ["line 1\n", "warn\n", "é\n"]
            async with await client.create_session("nodejs") as session:
                with pytest.raises(NotFoundError, match="no session s-1"):
                    await session.execute("1")

    asyncio.run(scenario())


def test_the_client_does_not_import_the_service_stack() -> None:
    code = (
        "import sys\nfrom execbox import Client, AsyncClient, Limits, NotFoundError\n"
        "heavy = [m for m in sys.modules if m.startswith(('execbox.service', 'execbox.isolation', 'execbox.pool',"
        " 'execbox.api', 'fastapi', 'uvicorn'))]\nprint(heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
