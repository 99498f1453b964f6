"""API keys against a real service: every endpoint but the open ones refuses a missing, wrong or
almost-right key with 401; both headers work; a key added or revoked with ``execbox keys``
takes effect without a restart; no key reaches a log line or /metrics."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_helpers import REPO_ROOT, Service, run_body
from mcp_helpers import Connection

KEYS = {"alice": "alice-api-key-0123456789abcdef", "bob": "bob-api-key-0123456789abcdefgh"}
ALICE = KEYS["alice"]
#: almost alice's key: one character changed (first, middle, last), one missing, one more
NEAR_MISSES = [
    "X" + ALICE[1:], ALICE[:10] + chr(ord(ALICE[10]) ^ 1) + ALICE[11:], ALICE[:-1] + "g", ALICE[:-1], ALICE + "0",
]
WRONG = ["nobody-api-key-0123456789abcdef", "alice", f"alice:{ALICE}", ALICE.upper(), *NEAR_MISSES]
PYTHON = "def main():\n    return 'ran'\n"

#: (method, path, JSON body) of every endpoint that needs a key
GUARDED: list[tuple[str, str, Any]] = [
    ("POST", "/run", run_body(PYTHON)),
    ("POST", "/v1/execute", {"code": PYTHON}),
    ("POST", "/v1/execute/stream", {"code": PYTHON}),
    ("GET", "/v1/info", None),
    ("POST", "/v1/sessions", {"language": "python"}),
    ("GET", "/v1/sessions", None),
    ("GET", "/v1/sessions/0123456789abcdef", None),
    ("DELETE", "/v1/sessions/0123456789abcdef", None),
    ("POST", "/v1/sessions/0123456789abcdef/execute", {"code": "1 + 1"}),
    ("GET", "/v1/sessions/0123456789abcdef/files", None),
    ("PUT", "/v1/sessions/0123456789abcdef/files/a.txt", None),
    ("GET", "/v1/sessions/0123456789abcdef/files/a.txt", None),
]
OPEN = ["/", "/healthz", "/livez", "/metrics"]


def _ids(endpoints: list[tuple[str, str, Any]]) -> list[str]:
    return [f"{method} {path}" for method, path, _ in endpoints]


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "keys"
    path.write_text("# test keys\n" + "".join(f"{name}:{key}\n" for name, key in KEYS.items()))
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def keyed(make_service: Any, keys_file: Path) -> Iterator[Service]:
    """Keys on, logging everything it logs (debug: uvicorn's access log too)."""
    service = make_service("keyed", {
        "SANDBOX_API_KEYS_FILE": str(keys_file),
        "SANDBOX_EXECUTOR_MANAGER_POOL_SIZE": "1",
        "SANDBOX_LOG_LEVEL": "debug",
    })
    yield service
    service.cleanup()


def send(client: httpx.Client, method: str, path: str, body: Any, headers: dict[str, str]) -> httpx.Response:
    if method == "PUT":
        return client.request(method, path, content=b"data", headers=headers)
    return client.request(method, path, json=body, headers=headers)


@pytest.mark.parametrize(("method", "path", "body"), GUARDED, ids=_ids(GUARDED))
def test_no_key_is_401(keyed: Service, method: str, path: str, body: Any) -> None:
    with keyed.client() as client:
        response = send(client, method, path, body, {})
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == "Bearer"
    assert "API key" in response.json()["detail"]


@pytest.mark.parametrize(("method", "path", "body"), GUARDED, ids=_ids(GUARDED))
def test_wrong_and_almost_right_keys_are_401(keyed: Service, method: str, path: str, body: Any) -> None:
    with keyed.client() as client:
        for wrong in WRONG:
            for headers in ({"Authorization": f"Bearer {wrong}"}, {"X-API-Key": wrong}):
                response = send(client, method, path, body, headers)
                assert response.status_code == 401, (headers, response.text)
        assert send(client, method, path, body, {"Authorization": "Bearer"}).status_code == 401
        # a right key in the wrong scheme is no key
        assert send(client, method, path, body, {"Authorization": f"Basic {ALICE}"}).status_code == 401
        assert send(client, method, path, body, {"Authorization": ALICE}).status_code == 401


@pytest.mark.parametrize(("method", "path", "body"), GUARDED, ids=_ids(GUARDED))
def test_either_header_lets_a_key_in(keyed: Service, method: str, path: str, body: Any) -> None:
    with keyed.client() as client:
        for headers in ({"Authorization": f"Bearer {ALICE}"}, {"authorization": f"bearer {KEYS['bob']}"},
                        {"X-API-Key": ALICE}):
            response = send(client, method, path, body, headers)
            assert response.status_code != 401, (headers, response.text)
            assert response.status_code < 500 or response.status_code == 501, response.text


def test_a_key_runs_code_on_every_execution_endpoint(keyed: Service) -> None:
    with keyed.client(headers={"X-API-Key": ALICE}) as client:
        run = client.post("/run", json=run_body(PYTHON))
        assert run.status_code == 200 and run.json()["result"]["value"] == "ran", run.text
        native = client.post("/v1/execute", json={"code": PYTHON})
        assert native.status_code == 200 and native.json()["result"]["value"] == "ran", native.text
        stream = client.post("/v1/execute/stream", json={"code": PYTHON})
        assert stream.status_code == 200 and "event: result" in stream.text, stream.text


def test_sessions_belong_to_the_key_that_made_them(keyed: Service) -> None:
    alice, bob = {"X-API-Key": ALICE}, {"Authorization": f"Bearer {KEYS['bob']}"}
    with keyed.client() as client:
        created = client.post("/v1/sessions", json={"language": "python"}, headers=alice)
        assert created.status_code == 201, created.text
        session = created.json()["id"]
        try:
            cell = client.post(f"/v1/sessions/{session}/execute", json={"code": "x = 41\nx + 1"}, headers=alice)
            assert cell.status_code == 200 and cell.json()["result"]["value"] == 42, cell.text
            for method, path, body in (
                ("GET", f"/v1/sessions/{session}", None),
                ("POST", f"/v1/sessions/{session}/execute", {"code": "x"}),
                ("GET", f"/v1/sessions/{session}/files", None),
                ("PUT", f"/v1/sessions/{session}/files/stolen.txt", None),
                ("GET", f"/v1/sessions/{session}/files/stolen.txt", None),
                ("DELETE", f"/v1/sessions/{session}", None),
            ):
                response = send(client, method, path, body, bob)
                assert response.status_code == 404, (method, path, response.text)
            assert session not in [s["id"] for s in client.get("/v1/sessions", headers=bob).json()["sessions"]]
            assert session in [s["id"] for s in client.get("/v1/sessions", headers=alice).json()["sessions"]]
            again = client.post(f"/v1/sessions/{session}/execute", json={"code": "x"}, headers=alice)
            assert again.json()["result"]["value"] == 41  # untouched by bob's tries
        finally:
            assert client.delete(f"/v1/sessions/{session}", headers=alice).status_code == 204


def test_mcp_needs_a_key_and_its_sessions_are_the_keys(keyed: Service, event_loop_thread: Any) -> None:
    with keyed.client() as client:
        assert client.post("/mcp", json={}).status_code == 401
    connections = {name: Connection(f"{keyed.url}/mcp", event_loop_thread.loop, headers={"X-API-Key": key})
                   for name, key in KEYS.items() if name in ("alice", "bob")}
    try:
        for connection in connections.values():
            connection.wait_connected(120)
        created = connections["alice"].call(lambda mcp: mcp.call_tool("create_session", {}))
        session = created.structured_content["session_id"]
        with keyed.client(headers={"X-API-Key": ALICE}) as client:  # alice's, over HTTP too
            assert client.get(f"/v1/sessions/{session}").status_code == 200
            refused = connections["bob"].call(
                lambda mcp: mcp.call_tool("run_in_session", {"session_id": session, "code": "1"}))
            assert refused.is_error is True
            assert client.delete(f"/v1/sessions/{session}").status_code == 204
    finally:
        for connection in connections.values():
            connection.close()


@pytest.mark.parametrize("path", OPEN)
def test_the_open_endpoints_need_no_key(keyed: Service, path: str) -> None:
    with keyed.client() as client:
        assert client.get(path).status_code == 200
        assert client.get(path, headers={"X-API-Key": "wrong"}).status_code == 200


def test_keys_added_and_revoked_take_effect_without_a_restart(keyed: Service, keys_file: Path) -> None:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("SANDBOX_")},
           "SANDBOX_API_KEYS_FILE": str(keys_file),
           "PYTHONPATH": str(REPO_ROOT)}
    added = subprocess.run([sys.executable, "-m", "execbox.cli", "keys", "add", "carol"], env=env,
                           cwd=keys_file.parent, capture_output=True, text=True, check=True)
    carol = added.stdout.strip()
    KEYS["carol"] = carol  # for the log check at the end of the module

    def status(key: str) -> int:
        with keyed.client() as client:
            return client.get("/v1/info", headers={"X-API-Key": key}).status_code

    deadline = time.monotonic() + 30
    while status(carol) != 200:  # the file is looked at once a second
        assert time.monotonic() < deadline, "the new key was never accepted"
        time.sleep(0.2)
    subprocess.run([sys.executable, "-m", "execbox.cli", "keys", "revoke", "carol"], env=env,
                   cwd=keys_file.parent, capture_output=True, check=True)
    while status(carol) != 401:
        assert time.monotonic() < deadline, "the revoked key was still accepted"
        time.sleep(0.2)
    assert status(ALICE) == 200


def test_zz_no_key_in_any_log_line_or_metric(keyed: Service) -> None:
    """Runs last in the module: by now every key above was sent, right and wrong (and once
    more here, so that the test stands alone)."""
    with keyed.client() as client:
        assert client.post("/run", json=run_body(PYTHON), headers={"X-API-Key": ALICE}).status_code == 200
        assert client.post("/run", json=run_body(PYTHON), headers={"X-API-Key": NEAR_MISSES[1]}).status_code == 401
        assert client.get("/v1/info").status_code == 401
        metrics = client.get("/metrics").text
    log = keyed.log()
    assert "execution" in log  # the log is there and has the executions in it
    assert "refused POST /run: a wrong API key" in log and "refused GET /v1/info: no API key" in log
    secrets = {*KEYS.values(), *(w for w in WRONG if len(w) >= 16)}
    for secret in secrets:
        assert secret not in log, "a key is in the service's log"
        assert secret not in metrics, "a key is in /metrics"
