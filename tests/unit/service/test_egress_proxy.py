"""The egress proxy on its own: request heads, decisions, caps, logs and counters.

A client connects to a port's UNIX socket as a sandbox's bridge would; upstream is an
HTTP server of the test on the host's loopback (127.0.0.1 is refused unless an IP rule
names it, which these tests do where they want a connection to succeed). Nothing leaves
this machine: 169.254.169.254 and the like are refused before any connection is made.
"""

from __future__ import annotations

import contextvars
import http.server
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from execbox.egress_rules import parse_rules
from execbox.errors import BadRequestError
from execbox.models import ExecutionRequest
from execbox.runtimes.base import EGRESS_SOCKET_NAME
from execbox.service.egress import (
    PROXY_URL,
    EgressCaps,
    EgressMetrics,
    EgressProxy,
    execution_rules,
    with_proxy,
)
from execbox.service.egress.http import Refusal, parse_head

KEY = f"ns-{os.getpid()}-egressunit"


# -- request heads ---------------------------------------------------------------------------


def test_connect_names_a_host_and_port() -> None:
    request = parse_head(b"CONNECT Files.PyPI.org:443 HTTP/1.1\r\nHost: files.pypi.org:443\r\n\r\n")
    assert (request.method, request.host, request.port, request.tunnel) == ("CONNECT", "files.pypi.org", 443, True)
    assert parse_head(b"CONNECT [2001:db8::1]:8443 HTTP/1.1\r\n\r\n").host == "2001:db8::1"


def test_an_absolute_uri_is_forwarded_in_origin_form_without_proxy_headers() -> None:
    head = (
        b"POST http://user:pw@api.example:8080/v1/x?q=1 HTTP/1.1\r\nHost: elsewhere\r\n"
        b"Proxy-Authorization: Basic abc\r\nProxy-Connection: keep-alive\r\nConnection: keep-alive, X-Secret\r\n"
        b"X-Secret: 1\r\nContent-Length: 2\r\n\r\n"
    )
    request = parse_head(head)
    assert (request.host, request.port, request.tunnel) == ("api.example", 8080, False)
    lines = request.head.decode().split("\r\n")
    assert lines[0] == "POST /v1/x?q=1 HTTP/1.1"
    assert "Host: api.example:8080" in lines
    assert "Content-Length: 2" in lines
    assert lines[-3:] == ["Connection: close", "", ""]
    lowered = request.head.decode().lower()
    for gone in ("elsewhere", "proxy-authorization", "proxy-connection", "keep-alive", "x-secret", "user:pw"):
        assert gone not in lowered


@pytest.mark.parametrize(
    ("head", "says"),
    [
        (b"GET /index.html HTTP/1.1\r\nHost: a\r\n\r\n", "absolute http:// URI"),
        (b"GET https://a.example/ HTTP/1.1\r\n\r\n", "through CONNECT"),
        (b"CONNECT a.example HTTP/1.1\r\n\r\n", "host:port"),
        (b"CONNECT a.example:0 HTTP/1.1\r\n\r\n", "host:port"),
        (b"GET http://a b/ HTTP/1.1\r\n\r\n", "request line"),
        (b"GET http://exa_mple!/ HTTP/1.1\r\n\r\n", "not a host name"),
        (b"GET http://a.example/ HTTP/2\r\n\r\n", "request line"),
    ],
)
def test_malformed_requests_are_refused_with_400(head: bytes, says: str) -> None:
    with pytest.raises(Refusal) as caught:
        parse_head(head)
    assert caught.value.status == 400
    assert says in caught.value.reason


# -- the execution's rules -----------------------------------------------------------------------


def test_a_request_narrows_the_servers_rules_and_gets_the_proxy_variables() -> None:
    server = parse_rules("*.example.com, 10.0.0.0/8")
    request = ExecutionRequest(code="", env={"A": "1", "HTTP_PROXY": "mine"})
    assert execution_rules(request, server) == server
    narrowed = ExecutionRequest(code="", egress=("api.example.com:443",))
    rules = execution_rules(narrowed, server)
    prepared = with_proxy(request, rules)
    assert prepared.egress == ("api.example.com:443",)
    assert prepared.env["A"] == "1"
    assert all(prepared.env[name] == PROXY_URL for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"))
    assert "NO_PROXY" not in prepared.env and "no_proxy" not in prepared.env
    off = with_proxy(request, execution_rules(ExecutionRequest(code="", egress=()), server))
    assert off.egress == () and off.env == request.env


@pytest.mark.parametrize(
    ("server", "egress", "says"),
    [
        ("*.example.com", ("example.org",), "not covered"),
        ("*.example.com", ("a.*.b",), "egress pattern"),
        ("", ("example.org",), "allows no network"),
    ],
)
def test_a_request_may_not_widen_the_servers_rules(server: str, egress: tuple[str, ...], says: str) -> None:
    with pytest.raises(BadRequestError, match=says):
        execution_rules(ExecutionRequest(code="", egress=egress), parse_rules(server))


# -- the proxy ---------------------------------------------------------------------------------


class _Upstream(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        if self.path.startswith("/stall"):
            time.sleep(30)
            return
        size = int(self.path.rsplit("/", 1)[-1]) if self.path.startswith("/bytes/") else 5
        self.send_response(200)
        self.send_header("Content-Length", str(size))
        self.send_header("X-Seen-Host", self.headers.get("Host", ""))
        self.end_headers()
        self.wfile.write(b"x" * size if size != 5 else b"hello")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def upstream() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


def _proxy(tmp_path: Path, **caps: float) -> EgressProxy:
    limits = {"connections": 8, "bytes": 1 << 20, "connection_time_s": 30.0, **caps}
    proxy = EgressProxy(EgressCaps(**limits), uids=range(os.getuid(), os.getuid() + 1), ports_dir=tmp_path / "ports")  # type: ignore[arg-type]
    proxy.start()
    return proxy


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[EgressProxy]:
    proxy = _proxy(tmp_path)
    yield proxy
    proxy.shutdown()


def _ask(directory: Path, head: str, timeout_s: float = 20.0) -> bytes:
    """Send one proxy request through a port; everything the proxy answers until it closes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        sock.connect(str(directory / EGRESS_SOCKET_NAME))
        sock.sendall(head.encode())
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def _get(url: str) -> str:
    return f"GET {url} HTTP/1.1\r\nHost: ignored\r\n\r\n"


def _wait_for(egress_log: list[dict[str, object]], count: int) -> list[dict[str, object]]:
    deadline = time.monotonic() + 20
    while len(egress_log) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    return egress_log


def test_a_port_without_an_execution_refuses(proxy: EgressProxy, upstream: int, egress_log: list) -> None:
    directory = proxy.open(KEY)
    answer = _ask(directory, _get(f"http://127.0.0.1:{upstream}/"))
    assert answer.startswith(b"HTTP/1.1 403 ")
    assert b"egress is off for this execution" in answer
    record = _wait_for(egress_log, 1)[0]
    assert record["decision"] == "refused" and record["execution_id"] is None and record["sandbox_id"] == KEY


def test_an_allowed_request_goes_through_and_is_logged(proxy: EgressProxy, upstream: int, egress_log: list) -> None:
    directory = proxy.open(KEY)
    with proxy.session(KEY, "exec-1", parse_rules(f"127.0.0.1:{upstream}")):
        answer = _ask(directory, _get(f"http://127.0.0.1:{upstream}/"))
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert answer.endswith(b"hello")
    assert f"X-Seen-Host: 127.0.0.1:{upstream}".encode() in answer  # Host comes from the URI
    record = _wait_for(egress_log, 1)[0]
    assert record["decision"] == "allowed" and record["status"] == 200
    assert (record["execution_id"], record["host"], record["port"], record["address"]) == (
        "exec-1", "127.0.0.1", upstream, "127.0.0.1",
    )  # fmt: skip
    assert record["bytes_down"] == len(answer) and record["bytes_up"] > 0
    stats = proxy.stats()
    assert (stats.allowed, stats.refused, stats.bytes_down) == (1, 0, len(answer))


def test_connect_tunnels(proxy: EgressProxy, upstream: int) -> None:
    directory = proxy.open(KEY)
    with proxy.session(KEY, "exec-1", parse_rules(f"127.0.0.1:{upstream}")):
        head = f"CONNECT 127.0.0.1:{upstream} HTTP/1.1\r\n\r\nGET /bytes/3 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        answer = _ask(directory, head)
    assert answer.startswith(b"HTTP/1.1 200 Connection established\r\n\r\nHTTP/1.1 200 ")
    assert answer.endswith(b"xxx")


@pytest.mark.parametrize(
    ("rules", "target", "says"),
    [
        ("127.0.0.1:1", "http://127.0.0.1:{port}/", "not in this execution's egress allowlist"),
        ("localhost", "http://localhost:{port}/", "non-public address"),  # a name that resolves inward
        ("*", "http://127.0.0.1:{port}/", "non-public address"),
        ("*", "http://169.254.169.254/latest/meta-data/", "non-public address"),
        ("*", "http://[::1]:{port}/", "non-public address"),
        ("*", "http://[fd00:ec2::254]/", "non-public address"),
    ],
)
def test_refusals_are_403_with_a_reason(
    proxy: EgressProxy, upstream: int, egress_log: list, rules: str, target: str, says: str
) -> None:
    directory = proxy.open(KEY)
    with proxy.session(KEY, "exec-1", parse_rules(rules)):
        answer = _ask(directory, _get(target.format(port=upstream)))
    assert answer.startswith(b"HTTP/1.1 403 Forbidden")
    assert says in answer.decode()
    record = _wait_for(egress_log, 1)[0]
    assert record["decision"] == "refused" and record["address"] is None and record["bytes_down"] == 0
    assert proxy.stats().refused == 1


def test_the_connection_cap(tmp_path: Path, upstream: int) -> None:
    proxy = _proxy(tmp_path, connections=2)
    try:
        directory = proxy.open(KEY)
        with proxy.session(KEY, "exec-1", parse_rules(f"127.0.0.1:{upstream}")):
            answers = [_ask(directory, _get(f"http://127.0.0.1:{upstream}/")) for _ in range(3)]
        assert [a.split(b" ")[1] for a in answers] == [b"200", b"200", b"403"]
        assert b"used its 2 connections" in answers[2]
        with proxy.session(KEY, "exec-2", parse_rules(f"127.0.0.1:{upstream}")):  # per execution
            assert _ask(directory, _get(f"http://127.0.0.1:{upstream}/")).startswith(b"HTTP/1.1 200 ")
    finally:
        proxy.shutdown()


def _capped(tmp_path: Path, upstream: int, path: str, egress_log: list, **caps: float) -> tuple[bytes, str]:
    """The answer to one request under ``caps``, and how the proxy says the connection ended."""
    proxy = _proxy(tmp_path, **caps)
    try:
        directory = proxy.open(KEY)
        with proxy.session(KEY, "exec-1", parse_rules(f"127.0.0.1:{upstream}")):
            answer = _ask(directory, _get(f"http://127.0.0.1:{upstream}{path}"))
        return answer, str(_wait_for(egress_log, 1)[0]["reason"])
    finally:
        proxy.shutdown()


def test_the_byte_cap_ends_the_connection(tmp_path: Path, upstream: int, egress_log: list) -> None:
    answer, reason = _capped(tmp_path, upstream, "/bytes/1000000", egress_log, bytes=100_000)
    assert answer.startswith(b"HTTP/1.1 200 ") and len(answer) <= 100_000
    assert "cap of 100000 bytes" in reason


def test_the_time_cap_ends_the_connection(tmp_path: Path, upstream: int, egress_log: list) -> None:
    answer, reason = _capped(tmp_path, upstream, "/stall", egress_log, connection_time_s=0.5)
    assert answer == b""
    assert "cap of 0.5 s per connection" in reason


def test_the_end_of_the_execution_ends_its_connections(proxy: EgressProxy, upstream: int, egress_log: list) -> None:
    directory = proxy.open(KEY)
    result: list[bytes] = []
    with proxy.session(KEY, "exec-1", parse_rules(f"127.0.0.1:{upstream}")):
        client = threading.Thread(target=lambda: result.append(_ask(directory, _get(f"http://127.0.0.1:{upstream}/stall"))))
        client.start()
        _wait_for_connection(proxy)
    client.join(20)
    assert result == [b""]
    assert _wait_for(egress_log, 1)[0]["reason"] == "the execution ended"


def _wait_for_connection(proxy: EgressProxy) -> None:
    """Until the proxy holds one connection upstream (its execution counted it)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        attached = list(proxy._attached.values())
        if attached and attached[0].connections and attached[0].tasks:
            time.sleep(0.1)  # connected upstream: now in the relay
            return
        time.sleep(0.01)


def test_close_removes_the_port(proxy: EgressProxy) -> None:
    directory = proxy.open(KEY)
    assert (directory / EGRESS_SOCKET_NAME).is_socket()
    proxy.close(KEY)
    assert not directory.exists()
    with pytest.raises(OSError), socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(directory / EGRESS_SOCKET_NAME))


def test_a_foreign_uid_is_refused(upstream: int) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to connect as another uid")
    reachable = Path(tempfile.mkdtemp(prefix="execbox-egress-"))  # pytest's tmp_path is root's only
    reachable.chmod(0o755)
    proxy = EgressProxy(EgressCaps(8, 1 << 20, 30.0), uids=range(60001, 60002), ports_dir=reachable / "ports")
    proxy.start()
    try:
        directory = proxy.open(KEY)
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.setresuid(60500, 60500, 60500)
                os.write(write_end, _ask(directory, _get(f"http://127.0.0.1:{upstream}/"))[:200])
            finally:
                os._exit(0)
        os.close(write_end)
        os.waitpid(pid, 0)
        assert b"uid 60500 is not a sandbox's" in os.read(read_end, 4096)
        os.close(read_end)
    finally:
        proxy.shutdown()
        shutil.rmtree(reachable)


def test_the_counters_are_prometheus_metrics(proxy: EgressProxy, upstream: int) -> None:
    directory = proxy.open(KEY)
    with proxy.session(KEY, "exec-1", parse_rules(f"127.0.0.1:{upstream}")):
        _ask(directory, _get(f"http://127.0.0.1:{upstream}/"))
        _ask(directory, _get("http://10.0.0.1/"))
    registry = CollectorRegistry()
    registry.register(EgressMetrics(proxy))
    deadline = time.monotonic() + 20
    while proxy.stats().refused < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    text = generate_latest(registry).decode()
    assert 'execbox_egress_connections_total{outcome="allowed"} 1.0' in text
    assert 'execbox_egress_connections_total{outcome="refused"} 1.0' in text
    assert 'execbox_egress_bytes_total{direction="down"}' in text


_REQUEST = contextvars.ContextVar("request", default="none")


def test_log_lines_are_written_in_the_context_of_the_request(proxy: EgressProxy, upstream: int) -> None:
    # what api/logs.py's request id filter reads: a context variable of the request being served
    seen: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(_REQUEST.get())

    handler, logger = Catch(), logging.getLogger("execbox.egress")
    logger.addHandler(handler)
    try:
        directory = proxy.open(KEY)
        token = _REQUEST.set("request-7")
        try:
            session = proxy.session(KEY, "exec-1", parse_rules(f"127.0.0.1:{upstream}"))
        finally:
            _REQUEST.reset(token)
        with session:  # entered elsewhere (the executor's worker thread) than it was made
            _ask(directory, _get(f"http://127.0.0.1:{upstream}/"))
        deadline = time.monotonic() + 20
        while not seen and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        logger.removeHandler(handler)
    assert seen == ["request-7"]
