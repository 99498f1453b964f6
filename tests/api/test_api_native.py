"""The native API (``/v1/execute``, ``/v1/info``), ``/metrics``, ``/openapi.json`` and ``/docs``."""

from __future__ import annotations

import base64
from typing import Any

import httpx
import pytest
from api_helpers import RUN_FIELDS, b64


def execute(client: httpx.Client, **body: Any) -> dict[str, Any]:
    response = client.post("/v1/execute", json=body)
    assert response.status_code == 200, response.text
    data = response.json()
    assert RUN_FIELDS <= set(data), "the native answer carries every /run field"
    return data


def test_stdin_files_and_arguments(client: httpx.Client) -> None:
    code = (
        "import fileinput\n"
        "from pathlib import Path\n"
        "def main(n):\n"
        "    lines = [line.rstrip() for line in fileinput.input(files=('-',))]\n"
        "    return {'stdin': lines, 'file': Path('data/input.txt').read_text(), 'n': n}\n"
    )
    body = execute(
        client, code=code, stdin="first\nsecond\n", arguments={"n": 3},
        files={"data/input.txt": base64.b64encode(b"from a file").decode()},
    )
    assert body["status"] == "success", body["stderr"]
    assert body["result"]["value"] == {"stdin": ["first", "second"], "file": "from a file", "n": 3}
    assert body["backend"]
    assert body["cpu_time_ms"] is None or body["cpu_time_ms"] >= 0


def test_env_reaches_the_program(client: httpx.Client) -> None:
    code = "function main() {\n  return process.env.GREETING + ' ' + process.env.NAME;\n}\n"
    body = execute(client, language="nodejs", code=code, env={"GREETING": "hello", "NAME": "sandbox"})
    assert body["status"] == "success", body["stderr"]
    assert body["result"]["value"] == "hello sandbox"


def test_per_request_wall_time_limit(client: httpx.Client) -> None:
    code = "import time\ndef main():\n    print('started', flush=True)\n    time.sleep(30)\n"
    body = execute(client, code=code, limits={"wall_time_s": 1})
    assert body["status"] == "resource_limit_exceeded"
    assert body["resource_limit_type"] == "time"
    assert body["exit_code"] == -124
    assert "Execution timeout" in body["stderr"]
    assert body["stdout"] == "started\n"
    assert 900 <= body["time_used_ms"] < 5000


def test_per_request_memory_limit(client: httpx.Client) -> None:
    code = "def main():\n    hog = []\n    while True:\n        hog.append(bytearray(8 * 1024 * 1024))\n"
    body = execute(client, code=code, limits={"memory_bytes": 64 << 20})
    assert body["status"] == "resource_limit_exceeded"
    assert body["resource_limit_type"] == "memory"
    assert body["exit_code"] == -137
    assert body["memory_used_kb"] <= 64 * 1024 + 1024


def test_per_request_output_limit(client: httpx.Client) -> None:
    code = "def main():\n    for _ in range(100000):\n        print('x' * 99)\n"
    body = execute(client, code=code, limits={"output_bytes": 10000})
    assert body["status"] == "resource_limit_exceeded"
    assert body["resource_limit_type"] == "output"
    assert len(body["stdout"]) <= 10000


@pytest.mark.parametrize(
    "limits",
    [{"wall_time_s": 3600}, {"memory_bytes": 1 << 40}, {"output_bytes": 1 << 40}],
    ids=["wall_time_s", "memory_bytes", "output_bytes"],
)
def test_limit_above_the_server_maximum_is_422(client: httpx.Client, limits: dict[str, int]) -> None:
    response = client.post("/v1/execute", json={"code": "def main():\n    return 1\n", "limits": limits})
    assert response.status_code == 422, response.text
    assert next(iter(limits)) in response.text


@pytest.mark.parametrize(
    "body",
    [
        {"code": "def main(): return 1", "limits": {"wall_time_s": -1}},
        {"code": "def main(): return 1", "limits": {"cpu_s": 1}},
        {"code": "def main(): return 1", "files": {"../escape.txt": b64("x")}},
        {"code": "def main(): return 1", "files": {"/etc/passwd": b64("x")}},
        {"code": "def main(): return 1", "files": {"ok.txt": "not base64!"}},
        {"code": "def main(): return 1", "env": {"A": 1}},
        {"code": "def main(): return 1", "unknown": True},
        {"code_b64": b64("def main(): return 1")},
    ],
    ids=["negative-limit", "unknown-limit", "dotdot-file", "absolute-file", "file-not-base64", "env-not-string",
         "unknown-field", "ragflow-body"],
)
def test_bad_native_requests_are_422(client: httpx.Client, body: dict[str, Any]) -> None:
    response = client.post("/v1/execute", json=body)
    assert response.status_code == 422, response.text


def test_info_describes_backend_limits_and_pools(client: httpx.Client) -> None:
    info = client.get("/v1/info").json()
    assert info["backend"]
    assert info["limits"]["wall_time_s"] == 10.0
    assert info["limits"]["memory_bytes"] == 256 << 20
    names = {pool["name"].split("/")[0] for pool in info["pools"]}
    assert names == {"python", "nodejs"}


def test_metrics_count_executions(client: httpx.Client) -> None:
    execute(client, code="def main():\n    return 1\n")
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    from prometheus_client.parser import text_string_to_metric_families

    samples = [sample for family in text_string_to_metric_families(response.text) for sample in family.samples]
    executions = [s for s in samples if s.name == "execbox_executions_total"]
    assert any(s.labels["language"] == "python" and s.labels["status"] == "success" and s.value >= 1 for s in executions)
    assert {s.labels["backend"] for s in executions} == {client.get("/v1/info").json()["backend"]}
    assert any(s.name == "execbox_execution_seconds_bucket" for s in samples)
    assert any(s.name == "execbox_pool_ready" for s in samples)
    assert any(s.name == "execbox_build_info" and s.labels["version"] for s in samples)


def test_openapi_documents_both_apis(client: httpx.Client) -> None:
    response = client.get("/openapi.json")
    assert response.status_code == 200
    schema = response.json()
    assert {"/run", "/v1/execute", "/healthz", "/v1/info"} <= set(schema["paths"])
    run_request = schema["components"]["schemas"]["RunRequest"]
    assert {"code_b64", "language", "arguments"} <= set(run_request["properties"])


def test_docs_page_is_served(client: httpx.Client) -> None:
    response = client.get("/docs")
    assert response.status_code == 200
    assert "text/html" in response.headers["content-type"]
    assert "openapi.json" in response.text


def _sse_events(client: httpx.Client, body: dict[str, Any]) -> list[tuple[str, str, float]]:
    """(event, data, seconds since the request) of each server-sent event."""
    import time

    events: list[tuple[str, str, float]] = []
    started = time.monotonic()
    with client.stream("POST", "/v1/execute/stream", json=body) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                assert name is not None
                events.append((name, line.removeprefix("data: "), time.monotonic() - started))
                name = None
    return events


def test_stream_sends_output_as_it_is_printed_then_the_result(client: httpx.Client) -> None:
    import json

    code = (
        "import time, warnings\n"
        "def main():\n"
        "    for i in range(3):\n"
        "        print('line', i, flush=True)\n"
        "        time.sleep(0.4)\n"
        "    warnings.warn('oops')\n"
        "    return 'done'\n"
    )
    events = _sse_events(client, {"code": code})
    names = [name for name, _, _ in events]
    assert names[-1] == "result" and names.count("result") == 1
    streamed = "".join(json.loads(data) for name, data, _ in events if name == "stdout")
    assert streamed == "line 0\nline 1\nline 2\n"
    assert "UserWarning: oops" in "".join(json.loads(data) for name, data, _ in events if name == "stderr")
    first_line_at = next(at for name, _, at in events if name == "stdout")
    result_at = events[-1][2]
    assert result_at - first_line_at >= 0.6, "the first line must arrive while the program still runs"
    result = json.loads(events[-1][1])
    assert result["status"] == "success"
    assert result["stdout"] == streamed
    assert result["result"]["value"] == "done"


def test_stream_rejects_limits_above_the_maxima_before_streaming(client: httpx.Client) -> None:
    response = client.post("/v1/execute/stream", json={"code": "def main():\n    return 1\n", "limits": {"wall_time_s": 1e6}})
    assert response.status_code == 422
    assert "wall_time_s" in response.text
