"""HTTP contract of issue 9 against real services, on both backends and in both languages.

* finding 1: nothing a program returns makes the service answer 500, on /run,
  /v1/execute and the /v1/execute/stream event stream; a lone surrogate in ``code`` is a
  422, not a 500;
* finding 4: a body shorter than its Content-Length, or one that trickles in, is answered
  408 and the connection closed within SANDBOX_BODY_TIMEOUT; a chunked body above the
  limit is a 413; bad env keys, file names and limits are 422s naming the field.
"""

from __future__ import annotations

import base64
import json
import selectors
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from api_helpers import Service

BODY_TIMEOUT_S = 1.0


def _gvisor_unavailable() -> str | None:
    from execbox.errors import BackendUnavailableError
    from execbox.service.backends import build_backend
    from execbox.settings import Settings

    try:
        build_backend("gvisor", Settings.load()).check()
    except BackendUnavailableError as exc:
        return str(exc)
    return None


@pytest.fixture(scope="module", params=["namespaces", "gvisor"])
def hardened(request: pytest.FixtureRequest, make_service: Any) -> Iterator[Service]:
    backend = str(request.param)
    if backend == "gvisor" and (reason := _gvisor_unavailable()) is not None:
        pytest.skip(f"gvisor backend unavailable: {reason}")
    service = make_service(
        f"hardening-{backend}",
        {"SANDBOX_BACKEND": backend, "SANDBOX_BODY_TIMEOUT": f"{BODY_TIMEOUT_S:g}s", "SANDBOX_EXECUTOR_MANAGER_POOL_SIZE": "1",
         "SANDBOX_CODE_CHECK": "off",  # the programs use open() and fs on purpose
         # a cap reached in far less than the body timeout, so a huge body is a 413, never a 408
         "SANDBOX_MAX_BODY_SIZE": "2m"},
    )
    yield service
    service.cleanup()


PROGRAMS: dict[tuple[str, str], tuple[str, str]] = {
    ("python", "lone surrogate"): ("def main():\n    return {'s\\udfff': 'a\\ud800'}\n", "success"),
    ("nodejs", "lone surrogate"): ("function main() { return { ['s\\udfff']: 'a\\ud800' }; }\n", "success"),
    ("python", "nested 800 deep"): ("def main():\n    v = 1\n    for _ in range(800):\n        v = [v]\n    return v\n", "program_error"),
    ("nodejs", "nested 800 deep"): ("function main() { let v = 1; for (let i = 0; i < 800; i++) v = [v]; return v; }\n", "program_error"),
    ("python", "nested 5000 deep"): ("def main():\n    v = 1\n    for _ in range(5000):\n        v = [v]\n    return v\n", "program_error"),
    ("nodejs", "nested 5000 deep"): ("function main() { let v = 1; for (let i = 0; i < 5000; i++) v = [v]; return v; }\n", "program_error"),
    ("python", "artifact name not UTF-8"): (
        "def main():\n    with open(b'artifacts/x\\xff.png', 'wb') as fh:\n        fh.write(b'png')\n    return 1\n", "success",
    ),
    ("nodejs", "artifact name not UTF-8"): (
        "const fs = require('fs');\n"
        "function main() { fs.writeFileSync(Buffer.from('artifacts/x\\xff.png', 'latin1'), 'png'); return 1; }\n", "success",
    ),
}


def _answer(service: Service, endpoint: str, language: str, code: str) -> dict[str, Any]:
    if endpoint == "/run":
        body: dict[str, Any] = {"code_b64": base64.b64encode(code.encode()).decode(), "language": language}
    else:
        body = {"code": code, "language": language}
    with service.client() as http:
        response = http.post(endpoint, json=body)
    assert response.status_code == 200, response.text[:300]
    if not endpoint.endswith("/stream"):
        data: dict[str, Any] = response.json()
        return data
    results = [b for b in response.text.split("\n\n") if b.startswith("event: result\n")]
    assert len(results) == 1, response.text[-300:]
    data = json.loads(results[0].split("data: ", 1)[1])
    return data


@pytest.mark.parametrize("endpoint", ["/run", "/v1/execute", "/v1/execute/stream"])
@pytest.mark.parametrize(("language", "case"), list(PROGRAMS))
def test_no_program_makes_a_500(hardened: Service, endpoint: str, language: str, case: str) -> None:
    code, status = PROGRAMS[(language, case)]
    answer = _answer(hardened, endpoint, language, code)
    assert answer["status"] == status, answer
    if status == "program_error":
        assert answer["detail"] == "invalid_result", answer
    if case == "lone surrogate":
        assert answer["result"]["value"] == {"s\ufffd": "a\ufffd"}
    if case.startswith("artifact") and endpoint != "/run":
        assert answer["artifacts_skipped"] == [{"name": "x\ufffd.png", "reason": "the file name is not valid UTF-8"}]


def test_lone_surrogate_in_code_is_422(hardened: Service) -> None:
    raw = b'{"code": "def main():\\n    return \'\\ud800\'\\n"}'
    with hardened.client() as http:
        for endpoint in ("/v1/execute", "/v1/execute/stream"):
            response = http.post(endpoint, content=raw, headers={"content-type": "application/json"})
            assert response.status_code == 422, response.text
            assert response.json()["detail"][0]["loc"] == ["body", "code"]


@pytest.mark.parametrize(
    ("extra", "field"),
    [({"env": {"A=B": "1"}}, "env"), ({"env": {"": "1"}}, "env"), ({"env": {"A": "x\u0000y"}}, "env"),
     ({"files": {".": "eA=="}}, "files"), ({"files": {"a\u0000": "eA=="}}, "files"),
     ({"limits": {"memory_bytes": 1}}, "memory_bytes"), ({"limits": {"wall_time_s": 1e9}}, "wall_time_s")],
)
def test_bad_fields_are_422_naming_them(hardened: Service, extra: dict[str, Any], field: str) -> None:
    with hardened.client() as http:
        response = http.post("/v1/execute", json={"code": "def main():\n    return 1\n", **extra})
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, list)
    assert any(field in [str(p) for p in error["loc"]] for error in detail), detail


def _raw_exchange(service: Service, head: bytes, pieces: Iterator[bytes], limit_s: float) -> tuple[bytes, float]:
    """Send ``head`` then ``pieces`` (as they come) while reading; returns what the server
    answered before closing the connection, and how long that took."""
    started = time.monotonic()
    received = b""
    with socket.create_connection(("127.0.0.1", service.port), timeout=limit_s) as sock, selectors.DefaultSelector() as sel:
        sock.sendall(head)
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ)
        pending = next(pieces, None)
        while time.monotonic() - started < limit_s:
            for _ in sel.select(0.05):
                try:
                    chunk = sock.recv(65536)
                except ConnectionResetError:
                    chunk = b""
                if not chunk:
                    return received, time.monotonic() - started
                received += chunk
            if pending is not None:
                try:
                    sent = sock.send(pending)
                    pending = pending[sent:] or next(pieces, None)
                except BlockingIOError:
                    pass
                except (BrokenPipeError, ConnectionResetError):
                    pending = None
    raise AssertionError(f"connection still open after {limit_s}s; received {received[:200]!r}")


def test_a_body_shorter_than_its_length_is_408_and_closed(hardened: Service) -> None:
    head = b"POST /run HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"code_b64\":"
    answer, elapsed = _raw_exchange(hardened, head, iter(()), limit_s=BODY_TIMEOUT_S + 10)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert elapsed < BODY_TIMEOUT_S + 5


def test_a_trickling_body_is_408_and_closed(hardened: Service) -> None:
    def trickle() -> Iterator[bytes]:
        for _ in range(40):
            time.sleep(0.25)
            yield b" "

    head = b"POST /v1/execute HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    answer, elapsed = _raw_exchange(hardened, head, trickle(), limit_s=BODY_TIMEOUT_S + 10)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert elapsed < BODY_TIMEOUT_S + 5


def test_a_huge_chunked_body_is_413(hardened: Service) -> None:
    def chunks() -> Iterator[bytes]:
        piece = b"x" * (1 << 20)
        yield b'a\r\n{"code": "\r\n'
        for _ in range(50):
            yield f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
        yield b'2\r\n"}\r\n0\r\n\r\n'

    head = b"POST /v1/execute HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    answer, _ = _raw_exchange(hardened, head, chunks(), limit_s=30)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]


def test_the_service_still_answers_after_the_bad_bodies(hardened: Service) -> None:
    with hardened.client() as http:
        response = http.post("/v1/execute", json={"code": "def main():\n    return 'fine'\n"})
    assert response.status_code == 200
    assert response.json()["result"]["value"] == "fine"
    assert isinstance(httpx.get(f"{hardened.url}/healthz").json(), dict)
