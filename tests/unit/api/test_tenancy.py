"""Keys, quotas and the wait queue over HTTP, in-process (the unisolated test backend).

401 for every guarded endpoint, the open ones open, both headers; /run without a key only
when allowed; a key's rate (429 + Retry-After on /v1, RAGFlow's 200/-429 on /run) and
concurrency (one key at its limit does not hold back another); sessions owned by their key;
a full wait queue answered at once (503 on /v1, -10 on /run and in the stream); Redis
unreachable is 503 (fail closed); the metrics carry key names, never keys.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from tests.redis_server import free_port

ALICE = "alice-inprocess-key-0123456789"
BOB = "bob-inprocess-key-0123456789ab"
KEYS = f"alice:{ALICE},bob:{BOB}"
QUICK = "def main():\n    return 'ok'\n"
SLEEPER = "import time\ndef main():\n    time.sleep(6)\n    return 'slept'\n"
RAGFLOW_LIMITED = {"status": "program_runner_error", "exit_code": -429,
                   "detail": "Too many requests, please try again later",
                   "stderr": "Too many requests, please try again later"}
DEADLINE_S = 30.0


def b64(code: str) -> str:
    return base64.b64encode(code.encode()).decode()


def key(value: str) -> dict[str, str]:
    return {"X-API-Key": value}


#: (method, path, body) of endpoints that need a key
GUARDED: list[tuple[str, str, Any]] = [
    ("POST", "/run", {"code_b64": b64(QUICK)}),
    ("POST", "/v1/execute", {"code": QUICK}),
    ("POST", "/v1/execute/stream", {"code": QUICK}),
    ("GET", "/v1/info", None),
    ("POST", "/v1/sessions", {"language": "python"}),
    ("GET", "/v1/sessions", None),
    ("GET", "/v1/sessions/abc", None),
    ("DELETE", "/v1/sessions/abc", None),
    ("POST", "/v1/sessions/abc/execute", {"code": "1"}),
    ("GET", "/v1/sessions/abc/files", None),
    ("PUT", "/v1/sessions/abc/files/a.txt", None),
    ("GET", "/v1/sessions/abc/files/a.txt", None),
    ("GET", "/mcp", None),
    ("GET", "/no/such/path", None),
]


def until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.02)


def pools(client: TestClient) -> list[dict[str, Any]]:
    return list(client.get("/healthz").json()["pools"])


def python_pool(client: TestClient) -> dict[str, int]:
    """The Python pools' counts, summed (the light pool and the preloaded one)."""
    found = [p for p in pools(client) if p["name"].startswith("python/")]
    return {key: sum(p[key] for p in found) for key in ("ready", "leased", "waiting")}


def metric(client: TestClient, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


@pytest.fixture(scope="module")
def keyed(make_client: Any) -> TestClient:
    return make_client(api_keys=KEYS)


def send(client: TestClient, method: str, path: str, body: Any, headers: dict[str, str]) -> Any:
    if method == "PUT":
        return client.request(method, path, content=b"x", headers=headers)
    return client.request(method, path, json=body, headers=headers)


@pytest.mark.parametrize(("method", "path", "body"), GUARDED, ids=[f"{m} {p}" for m, p, _ in GUARDED])
def test_guarded_endpoints_refuse_without_a_right_key(keyed: TestClient, method: str, path: str, body: Any) -> None:
    for headers in ({}, key("wrong"), key(ALICE[:-1] + "X"), {"Authorization": f"Bearer {ALICE}x"},
                    {"Authorization": f"Basic {ALICE}"}):
        response = send(keyed, method, path, body, headers)
        assert response.status_code == 401, (headers, response.text)
        assert response.headers["www-authenticate"] == "Bearer"
        assert "API key" in response.json()["detail"]


@pytest.mark.parametrize("path", ["/", "/healthz", "/livez", "/metrics", "/docs", "/openapi.json"])
def test_open_endpoints_need_no_key(keyed: TestClient, path: str) -> None:
    assert keyed.get(path).status_code == 200


def test_both_headers_let_a_key_in(keyed: TestClient) -> None:
    for headers in (key(ALICE), {"Authorization": f"Bearer {ALICE}"}, {"authorization": f"BEARER  {BOB} "}):
        response = keyed.post("/v1/execute", json={"code": QUICK}, headers=headers)
        assert response.status_code == 200, response.text
        assert response.json()["result"]["value"] == "ok"
    assert keyed.post("/run", json={"code_b64": b64(QUICK)}, headers=key(BOB)).json()["result"]["value"] == "ok"
    assert metric(keyed, "execbox_unauthenticated_requests_total") > 0


def test_sessions_belong_to_the_key_that_made_them(keyed: TestClient) -> None:
    created = keyed.post("/v1/sessions", json={"language": "python"}, headers=key(ALICE))
    assert created.status_code == 201, created.text
    session = created.json()["id"]
    try:
        assert keyed.get(f"/v1/sessions/{session}", headers=key(ALICE)).status_code == 200
        assert keyed.get(f"/v1/sessions/{session}", headers=key(BOB)).status_code == 404
        assert keyed.post(f"/v1/sessions/{session}/execute", json={"code": "1 + 1"}, headers=key(BOB)).status_code == 404
        assert keyed.delete(f"/v1/sessions/{session}", headers=key(BOB)).status_code == 404
        assert [s["id"] for s in keyed.get("/v1/sessions", headers=key(BOB)).json()["sessions"]] == []
        assert [s["id"] for s in keyed.get("/v1/sessions", headers=key(ALICE)).json()["sessions"]] == [session]
    finally:
        assert keyed.delete(f"/v1/sessions/{session}", headers=key(ALICE)).status_code == 204


def test_run_without_a_key_when_allowed(make_client: Any) -> None:
    client = make_client(api_keys=KEYS, run_without_key=True)
    response = client.post("/run", json={"code_b64": b64(QUICK)})
    assert response.status_code == 200 and response.json()["result"]["value"] == "ok"
    assert client.post("/run", json={"code_b64": b64(QUICK)}, headers=key("wrong")).status_code == 401
    assert client.post("/v1/execute", json={"code": QUICK}).status_code == 401


def test_a_keys_rate(make_client: Any) -> None:
    client = make_client(api_keys=KEYS, key_rate="3/minute")
    for _ in range(3):
        assert client.post("/run", json={"code_b64": b64(QUICK)}, headers=key(ALICE)).status_code == 200
    run = client.post("/run", json={"code_b64": b64(QUICK)}, headers=key(ALICE))
    assert run.status_code == 200  # RAGFlow's client raises on any other status
    assert {k: run.json()[k] for k in RAGFLOW_LIMITED} == RAGFLOW_LIMITED
    native = client.post("/v1/execute", json={"code": QUICK}, headers=key(ALICE))
    assert native.status_code == 429
    assert 1 <= int(native.headers["retry-after"]) <= 60
    assert native.json()["exit_code"] == -429
    assert "'alice' is over its rate of 3/minute (SANDBOX_KEY_RATE)" in native.json()["detail"]
    stream = client.post("/v1/execute/stream", json={"code": QUICK}, headers=key(ALICE))
    assert stream.status_code == 429 and "retry-after" in stream.headers
    session = client.post("/v1/sessions", json={"language": "python"}, headers=key(ALICE))
    assert session.status_code == 429 and "retry-after" in session.headers
    assert client.post("/v1/execute", json={"code": QUICK}, headers=key(BOB)).status_code == 200  # its own budget
    assert metric(client, "execbox_quota_refusals_total", key="alice", quota="rate") == 4
    metrics = client.get("/metrics").text
    assert ALICE not in metrics and BOB not in metrics


def test_one_key_at_its_concurrency_does_not_hold_back_another(make_client: Any) -> None:
    client = make_client(api_keys=KEYS, key_max_concurrent=1, timeout="30s")
    with ThreadPoolExecutor(2) as threads:
        sleeper: Future[Any] = threads.submit(client.post, "/v1/execute", json={"code": SLEEPER}, headers=key(ALICE))
        until(lambda: python_pool(client)["leased"] == 1, "alice's sleeper runs")
        refused = client.post("/v1/execute", json={"code": QUICK}, headers=key(ALICE))
        assert refused.status_code == 429, refused.text
        assert "already runs 1 execution" in refused.json()["detail"]
        assert int(refused.headers["retry-after"]) >= 1
        run = client.post("/run", json={"code_b64": b64(QUICK)}, headers=key(ALICE))
        assert run.status_code == 200 and run.json()["exit_code"] == -429
        other = client.post("/v1/execute", json={"code": QUICK}, headers=key(BOB))
        assert other.status_code == 200 and other.json()["result"]["value"] == "ok"
        assert not sleeper.done()  # bob ran while alice was still at her limit
        assert sleeper.result().json()["result"]["value"] == "slept"
    again = client.post("/v1/execute", json={"code": QUICK}, headers=key(ALICE))  # her slot came back
    assert again.status_code == 200
    assert metric(client, "execbox_quota_refusals_total", key="alice", quota="concurrency") == 2


def test_without_keys_the_quotas_are_one_anonymous_bucket(make_client: Any) -> None:
    client = make_client(key_rate="2/minute")
    assert [client.post("/v1/execute", json={"code": QUICK}).status_code for _ in range(3)] == [200, 200, 429]
    assert client.post("/run", json={"code_b64": b64(QUICK)}).json()["exit_code"] == -429


def test_a_full_queue_is_answered_at_once(make_client: Any) -> None:
    """Pool of 1 (at most 2 live sandboxes) and a queue of 1: with two running and one
    waiting, the next request is refused without waiting SANDBOX_POOL_WAIT (1 h here)."""
    client = make_client(queue_max=1, pool_wait="1h", timeout="30s")
    with ThreadPoolExecutor(3) as threads:
        running = [threads.submit(client.post, "/v1/execute", json={"code": SLEEPER}) for _ in range(2)]
        until(lambda: python_pool(client)["leased"] == 2, "two sleepers run")
        waiting = threads.submit(client.post, "/v1/execute", json={"code": QUICK})
        until(lambda: python_pool(client)["waiting"] == 1, "one request waits")
        refused = client.post("/v1/execute", json={"code": QUICK})
        assert refused.status_code == 503, refused.text
        assert refused.headers["retry-after"] == "1"
        assert "already wait" in refused.json()["detail"]
        run = client.post("/run", json={"code_b64": b64(QUICK)})
        assert run.status_code == 200
        assert (run.json()["exit_code"], run.json()["detail"]) == (-10, "no_available_container")
        stream = client.post("/v1/execute/stream", json={"code": QUICK})
        assert stream.status_code == 200 and '"exit_code":-10' in stream.text.replace(" ", "")
        assert all(not f.done() for f in (*running, waiting))  # refused while they still ran and waited
        assert waiting.result().json()["result"]["value"] == "ok"  # the one that queued is served
        assert all(f.result().json()["result"]["value"] == "slept" for f in running)


def test_redis_unreachable_fails_closed(make_client: Any) -> None:
    client = make_client(api_keys=KEYS, key_rate="100/minute", redis_url=f"redis://127.0.0.1:{free_port()}/0")
    native = client.post("/v1/execute", json={"code": QUICK}, headers=key(ALICE))
    assert native.status_code == 503 and "retry-after" in native.headers
    assert "quota store" in native.json()["detail"]
    run = client.post("/run", json={"code_b64": b64(QUICK)}, headers=key(ALICE))
    assert run.status_code == 200
    assert (run.json()["exit_code"], run.json()["detail"]) == (-3, "internal_error")
    assert client.get("/healthz").status_code == 200  # what needs no quota still answers
    assert client.get("/v1/info", headers=key(ALICE)).status_code == 200


def test_keys_reach_no_log_line(make_client: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG")
    client = make_client(api_keys=KEYS, key_rate="1/minute")
    for headers in (key(ALICE), key(ALICE), key(ALICE[:-1] + "Z"), {"Authorization": f"Bearer {BOB}"}):
        client.post("/run", json={"code_b64": b64(QUICK)}, headers=headers)
    assert "refused POST /run: a wrong API key" in caplog.text
    for secret in (ALICE, BOB, ALICE[:-1]):
        assert secret not in caplog.text
