"""Session pinning (execbox/api/replicas.py): calls for another replica's session reach it.

Two in-process replicas: the front one is the :class:`ReplicaForwarder` over an app that
records what it was asked; the owner is a small FastAPI app holding sessions and files,
reached through httpx's ASGI transport (or a MockTransport where a test needs to see the
timing of a stream, a refused connection or a cancelled request). Nothing goes over the
network but one test's connection to a closed loopback port.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request, Response
from fastapi.responses import StreamingResponse

from execbox.api.replicas import FORWARDED_BY_HEADER, ReplicaForwarder, forwarder_options, session_replica
from execbox.errors import ConfigurationError
from execbox.settings import Settings

TOKEN = "0123456789abcdef0123456789abcdef"
OWN = f"front-7d9f.{TOKEN}"
FOREIGN = f"owner-5c2b.{TOKEN}"


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def local_app() -> tuple[FastAPI, list[str]]:
    """The front replica's own app: answers every call itself and records its path."""
    app = FastAPI()
    seen: list[str] = []

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE"])
    async def anything(path: str, request: Request) -> dict[str, Any]:
        seen.append(request.url.path)
        return {"answered_by": "front"}

    return app, seen


def owner_app() -> FastAPI:
    """The owner replica: a session's files, an execute that echoes what it received."""
    app = FastAPI()
    files: dict[str, bytes] = {}

    @app.post("/v1/sessions/{sid}/execute")
    async def execute(sid: str, request: Request) -> Response:
        body = {
            "sid": sid,
            "body": (await request.body()).decode(),
            "query": request.url.query,
            "headers": {name: value for name, value in request.headers.items()},
        }
        return Response(json.dumps(body), status_code=200, media_type="application/json",
                        headers={"x-owner": "yes", "connection": "close, x-owner-private", "x-owner-private": "1",
                                 "keep-alive": "timeout=5"})

    @app.put("/v1/sessions/{sid}/files/{path:path}", status_code=201)
    async def put_file(sid: str, path: str, request: Request) -> dict[str, Any]:
        files[path] = await request.body()
        return {"path": path, "size": len(files[path])}

    @app.get("/v1/sessions/{sid}/files/{path:path}")
    async def get_file(sid: str, path: str) -> Response:
        if path not in files:
            return Response(json.dumps({"detail": "no such file"}), status_code=404, media_type="application/json")
        return Response(files[path], media_type="application/octet-stream")

    @app.delete("/v1/sessions/{sid}", status_code=204)
    async def delete(sid: str) -> Response:
        return Response(status_code=204)

    @app.post("/v1/sessions/{sid}/execute/stream")
    async def stream(sid: str) -> StreamingResponse:
        async def events() -> AsyncIterator[str]:
            for n in range(3):
                yield f"event: stdout\ndata: {n}\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def front(app: Any, transport: httpx.AsyncBaseTransport | None = None, **options: Any) -> ReplicaForwarder:
    options.setdefault("replica_name", "front-7d9f")
    options.setdefault("peers", {"owner-5c2b": "http://owner.internal:9385"})
    return ReplicaForwarder(app, transport=transport, **options)


async def call(app: Any, method: str, path: str, **kwargs: Any) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://front") as client:
        return await client.request(method, path, **kwargs)


def answer(status: int, body: Any) -> httpx.Response:
    """An upstream's answer whose body is read as a stream, as from a real connection (httpx
    reads a body given as bytes at once)."""
    return httpx.Response(status, headers={"content-type": "application/json"},
                          stream=httpx.ByteStream(json.dumps(body).encode()))


def refusing(calls: list[httpx.Request]) -> httpx.MockTransport:
    """An upstream that records what reached it and fails the test's expectations if used."""

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(599)

    return httpx.MockTransport(handler)


# -- which calls are forwarded --------------------------------------------------------


@pytest.mark.parametrize(
    ("session_id", "replica"),
    [
        (FOREIGN, "owner-5c2b"),
        (f"execbox-7b5c9d8f6-x2k4q.{TOKEN}", "execbox-7b5c9d8f6-x2k4q"),
        (TOKEN, None),  # a service without a replica name
        (f"owner.{TOKEN[:-1]}", None),  # not 32 hex
        (f"owner.{TOKEN.upper()}", None),
        (f"Replica.A.{TOKEN}", "Replica.A"),  # what SANDBOX_REPLICA_NAME accepts
        (f"owner_1.{TOKEN}", None),
        (f"evil.com:80/x.{TOKEN}", None),
        (f"-owner.{TOKEN}", None),
        (f".{TOKEN}", None),
    ],
)
def test_the_replica_a_session_id_names(session_id: str, replica: str | None) -> None:
    assert session_replica(session_id) == replica


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", f"/v1/sessions/{OWN}/execute"),  # this replica's own session
        ("GET", f"/v1/sessions/{TOKEN}"),  # an id without a replica
        ("POST", "/v1/sessions"),  # a new session is made where the call lands
        ("GET", "/v1/sessions"),
        ("POST", "/v1/execute"),
        ("GET", f"/v1/other/{FOREIGN}"),
        ("GET", f"/v1/sessions/owner.{TOKEN[:8]}/files"),
    ],
)
def test_calls_that_are_not_for_another_replica_are_answered_here(method: str, path: str) -> None:
    app, seen = local_app()
    upstream: list[httpx.Request] = []
    response = run(call(front(app, refusing(upstream)), method, path))
    assert response.status_code == 200 and response.json() == {"answered_by": "front"}
    assert seen == [path] and upstream == []


def test_a_forwarded_call_is_never_forwarded_again() -> None:
    app, seen = local_app()
    upstream: list[httpx.Request] = []
    path = f"/v1/sessions/{FOREIGN}"
    response = run(call(front(app, refusing(upstream)), "GET", path, headers={FORWARDED_BY_HEADER: "elsewhere"}))
    assert response.json() == {"answered_by": "front"} and seen == [path] and upstream == []


# -- what is forwarded, and what comes back --------------------------------------------


def test_a_call_for_another_replicas_session_reaches_it_with_its_body_and_headers() -> None:
    app, seen = local_app()
    proxy = front(app, httpx.ASGITransport(app=owner_app(), client=("10.1.2.3", 5000)))
    response = run(call(
        proxy, "POST", f"/v1/sessions/{FOREIGN}/execute?verbose=1",
        content=b'{"code": "x = 1"}',
        headers={
            "authorization": "Bearer secret-key",
            "x-api-key": "k2",
            "content-type": "application/json",
            "x-forwarded-for": "192.0.2.7",
            "connection": "keep-alive, x-front-private",
            "x-front-private": "not for the owner",
            "te": "trailers",
            "proxy-authorization": "Basic front-proxy",
        },
    ))
    assert seen == []
    assert response.status_code == 200
    echoed = response.json()
    assert echoed["sid"] == FOREIGN and echoed["body"] == '{"code": "x = 1"}' and echoed["query"] == "verbose=1"
    headers = echoed["headers"]
    assert headers["authorization"] == "Bearer secret-key" and headers["x-api-key"] == "k2"  # the owner checks keys
    assert headers["content-type"] == "application/json"
    assert headers[FORWARDED_BY_HEADER] == "front-7d9f"
    assert headers["x-forwarded-for"].startswith("192.0.2.7, ")  # the chain, then the client the front saw
    assert headers["host"] == "owner.internal:9385"
    for hop in ("x-front-private", "te", "proxy-authorization"):
        assert hop not in headers, hop
    assert headers.get("connection") in (None, "keep-alive")  # httpx's own, between front and owner
    # the owner's answer, less its hop-by-hop headers
    assert response.headers["x-owner"] == "yes"
    assert "x-owner-private" not in response.headers and "keep-alive" not in response.headers


def test_raw_file_bodies_pass_through_unchanged_both_ways() -> None:
    app, _ = local_app()
    proxy = front(app, httpx.ASGITransport(app=owner_app()))
    data = bytes(range(256)) * 64 + b"\xff\xfe not utf-8"
    path = f"/v1/sessions/{FOREIGN}/files/data%20dir/blob.bin"

    async def scenario() -> tuple[httpx.Response, httpx.Response, httpx.Response]:
        put = await call(proxy, "PUT", path, content=data, headers={"content-type": "application/octet-stream"})
        got = await call(proxy, "GET", path)
        missing = await call(proxy, "GET", f"/v1/sessions/{FOREIGN}/files/nope")
        return put, got, missing

    put, got, missing = run(scenario())
    assert put.status_code == 201 and put.json() == {"path": "data dir/blob.bin", "size": len(data)}
    assert got.status_code == 200 and got.content == data
    assert got.headers["content-type"] == "application/octet-stream"
    assert missing.status_code == 404 and missing.json() == {"detail": "no such file"}  # the owner's own 404


def test_a_chunked_request_body_reaches_the_owner_whole() -> None:
    app, _ = local_app()
    proxy = front(app, httpx.ASGITransport(app=owner_app()))

    async def body() -> AsyncIterator[bytes]:
        for part in (b'{"code": ', b'"print(1)"', b"}"):
            yield part

    response = run(call(proxy, "POST", f"/v1/sessions/{FOREIGN}/execute", content=body()))
    assert response.json()["body"] == '{"code": "print(1)"}'


def test_a_status_without_a_body_comes_back() -> None:
    app, _ = local_app()
    response = run(call(front(app, httpx.ASGITransport(app=owner_app())), "DELETE", f"/v1/sessions/{FOREIGN}"))
    assert response.status_code == 204 and response.content == b""


def test_server_sent_events_pass_through_as_they_are_produced() -> None:
    """Each event reaches the client before the owner produces the next one."""
    app, _ = local_app()
    released = [asyncio.Event() for _ in range(3)]
    delivered: list[bytes] = []

    async def events() -> AsyncIterator[bytes]:
        for n, gate in enumerate(released):
            await gate.wait()
            yield f"event: stdout\ndata: {n}\n\n".encode()

    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=events())

    proxy = front(app, httpx.MockTransport(handler))

    async def scenario() -> None:
        sent: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

        async def receive() -> dict[str, Any]:
            await asyncio.Event().wait()  # the client stays
            raise AssertionError("unreachable")

        scope = http_scope("POST", f"/v1/sessions/{FOREIGN}/execute/stream", [])
        task = asyncio.ensure_future(proxy(scope, receive, sent.put))
        start = await asyncio.wait_for(sent.get(), 5)
        assert start["type"] == "http.response.start" and start["status"] == 200
        for n, gate in enumerate(released):
            gate.set()
            message = await asyncio.wait_for(sent.get(), 5)
            delivered.append(message["body"])
            assert message["body"] == f"event: stdout\ndata: {n}\n\n".encode() and message["more_body"]
            if n + 1 < len(released):
                assert sent.empty()  # nothing more until the owner writes again
        end = await asyncio.wait_for(sent.get(), 5)
        assert end == {"type": "http.response.body", "body": b"", "more_body": False}
        await asyncio.wait_for(task, 5)

    run(scenario())
    assert len(delivered) == 3


def http_scope(method: str, path: str, headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
        "path": path, "raw_path": path.encode(), "query_string": b"", "headers": headers,
        "client": ("127.0.0.1", 40000), "server": ("front", 80),
    }


def test_a_client_that_goes_away_closes_the_forwarded_call() -> None:
    app, _ = local_app()
    upstream_cancelled = asyncio.Event
    state: dict[str, Any] = {}

    async def handler(request: httpx.Request) -> httpx.Response:
        state["reached"].set()
        try:
            await asyncio.Event().wait()  # a long cell
        except asyncio.CancelledError:
            state["cancelled"].set()
            raise
        raise AssertionError("unreachable")

    proxy = front(app, httpx.MockTransport(handler))

    async def scenario() -> None:
        state.update(reached=asyncio.Event(), cancelled=upstream_cancelled(), gone=asyncio.Event())
        messages = [{"type": "http.request", "body": b'{"code": "while True: pass"}', "more_body": False}]
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            if messages:
                return messages.pop(0)
            await state["gone"].wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = http_scope("POST", f"/v1/sessions/{FOREIGN}/execute", [(b"content-length", b"28")])
        task = asyncio.ensure_future(proxy(scope, receive, send))
        await asyncio.wait_for(state["reached"].wait(), 5)
        state["gone"].set()
        await asyncio.wait_for(state["cancelled"].wait(), 5)
        await asyncio.wait_for(task, 5)
        assert sent == []  # nobody to answer

    run(scenario())


# -- a replica that is gone -----------------------------------------------------------


@pytest.mark.parametrize(
    "failure",
    [
        httpx.ConnectError("[Errno 111] Connection refused"),
        httpx.ConnectError("[Errno -2] Name or service not known"),
        httpx.ConnectTimeout("timed out"),
    ],
    ids=["refused", "no-such-name", "timeout"],
)
@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "DELETE"])
def test_the_sessions_of_a_replica_that_is_gone_are_a_clean_404(failure: Exception, method: str) -> None:
    app, seen = local_app()

    def handler(request: httpx.Request) -> httpx.Response:
        raise failure

    response = run(call(front(app, httpx.MockTransport(handler)), method, f"/v1/sessions/{FOREIGN}/execute",
                        content=b"{}" if method in ("POST", "PUT") else None))
    assert response.status_code == 404 and seen == []
    detail = response.json()["detail"]
    assert isinstance(detail, str) and FOREIGN in detail and "owner-5c2b" in detail


def test_a_refused_connection_on_loopback_is_a_404() -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    app, _ = local_app()
    proxy = front(app, peers={}, url_template=f"http://127.0.0.1:{port}/{{replica}}")
    response = run(call(proxy, "GET", f"/v1/sessions/{FOREIGN}"))
    assert response.status_code == 404 and "owner-5c2b" in response.json()["detail"]


def test_a_replica_nothing_gives_an_address_for_is_a_404_without_a_connection() -> None:
    app, seen = local_app()
    upstream: list[httpx.Request] = []
    proxy = front(app, refusing(upstream), peers={"someone-else": "http://x:1"}, url_template=None)
    response = run(call(proxy, "GET", f"/v1/sessions/{FOREIGN}/files"))
    assert response.status_code == 404 and upstream == [] and seen == []
    assert "SANDBOX_REPLICA_URL_TEMPLATE" in response.json()["detail"]


def test_a_replica_that_fails_after_accepting_the_call_is_a_502() -> None:
    app, _ = local_app()

    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.RemoteProtocolError("Server disconnected without sending a response.")

    response = run(call(front(app, httpx.MockTransport(handler)), "GET", f"/v1/sessions/{FOREIGN}"))
    assert response.status_code == 502 and "owner-5c2b" in response.json()["detail"]


# -- where a replica is ---------------------------------------------------------------


def test_peers_come_before_the_template() -> None:
    proxy = ReplicaForwarder(local_app()[0], replica_name="a", peers={"b": "http://10.0.0.2:9385/"},
                             url_template="http://{replica}.execbox-peers.ns.svc:9385")
    assert proxy.replica_url("b") == "http://10.0.0.2:9385"
    assert proxy.replica_url("execbox-5c-x2") == "http://execbox-5c-x2.execbox-peers.ns.svc:9385"
    assert proxy.replica_url("evil.com:80/") is None  # never a name that could change the URL's form
    assert proxy.replica_url("user@host") is None


def test_the_template_decides_where_a_call_goes() -> None:
    app, _ = local_app()
    reached: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        reached.append(str(request.url))
        return answer(200, {"ok": True})

    proxy = front(app, httpx.MockTransport(handler), peers={}, url_template="http://{replica}.execbox-peers:9385")
    response = run(call(proxy, "GET", f"/v1/sessions/{FOREIGN}/files?x=1"))
    assert response.json() == {"ok": True}
    assert reached == [f"http://owner-5c2b.execbox-peers:9385/v1/sessions/{FOREIGN}/files?x=1"]


def test_options_come_from_the_settings() -> None:
    settings = Settings.load(None, replica_name="a", replica_peers="a=http://127.0.0.1:9001/, b=http://127.0.0.1:9002",
                             replica_url_template="http://{replica}.execbox-peers:9385")
    assert forwarder_options(settings) == {
        "replica_name": "a",
        "peers": {"a": "http://127.0.0.1:9001", "b": "http://127.0.0.1:9002"},
        "url_template": "http://{replica}.execbox-peers:9385",
    }
    assert forwarder_options(Settings.load(None)) == {"replica_name": None, "peers": {}, "url_template": None}


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("replica_peers", "a=ftp://x:1"),
        ("replica_peers", "a"),
        ("replica_peers", "a/b=http://x:1"),
        ("replica_peers", "a=http://"),
        ("replica_url_template", "http://execbox-peers:9385"),
        ("replica_url_template", "{replica}.execbox-peers:9385"),
    ],
)
def test_malformed_replica_settings_stop_start_up(name: str, value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(f"SANDBOX_{name.upper()}", value)
    with pytest.raises(ConfigurationError, match=f"SANDBOX_{name.upper()}"):
        Settings.load(None)


def test_the_client_to_the_replicas_is_closed_at_shutdown() -> None:
    app, _ = local_app()
    proxy = front(app, httpx.MockTransport(lambda request: answer(200, {})))

    async def scenario() -> Callable[[], bool]:
        await call(proxy, "GET", f"/v1/sessions/{FOREIGN}")
        client = proxy._client
        assert client is not None and not client.is_closed
        messages = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return messages.pop(0)

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await proxy({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, receive, send)
        assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
        return lambda: client.is_closed

    assert run(scenario())()
