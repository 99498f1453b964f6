"""The HTTP contract in-process, with the real drivers (the unisolated test backend).

RAGFlow's ``/run`` and the native ``/v1/execute`` and its stream: the same verdicts as
on a real backend, where they do not depend on isolation (success, program errors,
the static check, the time limit, the output cap, inputs, limits). The isolation itself is
tested by tests/contract and tests/escape, on the real backends.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from fastapi.testclient import TestClient

from execbox.wire import NATIVE_FIELDS, RUN_FIELDS


def run(client: TestClient, code: str, **body: Any) -> dict[str, Any]:
    response = client.post("/run", json={"code_b64": base64.b64encode(code.encode()).decode(), **body})
    assert response.status_code == 200, response.text
    assert tuple(response.json()) == RUN_FIELDS
    return dict(response.json())


def execute(client: TestClient, code: str, **body: Any) -> dict[str, Any]:
    response = client.post("/v1/execute", json={"code": code, **body})
    assert response.status_code == 200, response.text
    assert tuple(response.json()) == NATIVE_FIELDS
    return dict(response.json())


def events(client: TestClient, body: dict[str, Any]) -> list[tuple[str, Any]]:
    """The (event, data) pairs of one stream, comments left out."""
    with client.stream("POST", "/v1/execute/stream", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        text = response.read().decode()
    found = []
    for block in text.split("\n\n"):
        lines = [line for line in block.splitlines() if not line.startswith(":")]
        if lines:
            fields = dict(line.split(": ", 1) for line in lines)
            found.append((fields["event"], json.loads(fields["data"])))
    return found


# -- /run ----------------------------------------------------------------------------------


def test_run_python_success(contract: TestClient) -> None:
    body = run(contract, "def main(a, b):\n    print('adding')\n    return {'sum': a + b}\n", arguments={"a": 2, "b": 3})
    assert body["status"] == "success" and body["exit_code"] == 0
    assert body["stdout"] == "adding\n"
    assert body["result"] == {"present": True, "value": {"sum": 5}, "type": "json"}


def test_run_nodejs_success(contract: TestClient, node: None) -> None:
    body = run(contract, "function main(args) { return args.n * 2 }\nmodule.exports = { main };\n",
               language="javascript", arguments={"n": 21})
    assert body["status"] == "success"
    assert body["result"]["value"] == 42


def test_run_program_error(contract: TestClient) -> None:
    body = run(contract, "def main():\n    raise ValueError('no good')\n")
    assert body["status"] == "program_error" and body["exit_code"] == 1
    assert "ValueError: no good" in body["stderr"]
    assert body["result"] is None


def test_run_no_main(contract: TestClient) -> None:
    body = run(contract, "x = 1\n")
    assert body["status"] == "program_error"
    assert "main" in body["stderr"]


def test_run_nonzero_exit(contract: TestClient) -> None:
    body = run(contract, "import sys\ndef main():\n    sys.exit(3)\n")
    assert body["status"] == "program_error" and body["exit_code"] == 3


def test_run_timeout_is_minus_124(contract: TestClient) -> None:
    body = run(contract, "import time\ndef main():\n    print('before', flush=True)\n    time.sleep(60)\n")
    assert body["status"] == "resource_limit_exceeded"
    assert body["resource_limit_type"] == "time" and body["exit_code"] == -124
    assert "Execution timeout" in body["stderr"]
    assert body["stdout"] == "before\n"  # the output so far is kept


def test_run_code_check_is_minus_999(contract: TestClient) -> None:
    body = run(contract, "import subprocess\ndef main():\n    return subprocess.run(['id'])\n")
    assert body["status"] == "program_runner_error" and body["exit_code"] == -999
    assert body["detail"] == "Code is unsafe"
    assert "Line 1" in body["stderr"]


def test_run_output_cap(contract: TestClient) -> None:
    body = run(contract, "def main():\n    print('x' * 200000)\n")
    assert body["status"] == "resource_limit_exceeded" and body["resource_limit_type"] == "output"
    assert len(body["stdout"]) <= 64 << 10


def test_run_artifacts(contract: TestClient) -> None:
    body = run(contract, "def main():\n    with open('artifacts/t.csv', 'w') as f:\n        f.write('a,b\\n1,2\\n')\n    return 1\n")
    assert body["artifacts"] == [
        {"name": "t.csv", "mime_type": "text/csv", "size": 8, "content_b64": base64.b64encode(b"a,b\n1,2\n").decode()}
    ]


def test_run_bad_base64_is_422(contract: TestClient) -> None:
    response = contract.post("/run", json={"code_b64": "not base64!"})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "code_b64"]


# -- /v1/execute ---------------------------------------------------------------------------


def test_execute_with_stdin_files_and_env(contract: TestClient) -> None:
    code = (
        "import os, sys\n"
        "def main():\n"
        "    return {'stdin': sys.stdin.read(), 'file': open('data/in.txt').read(), 'env': os.environ['MODE']}\n"
    )
    body = execute(contract, code, stdin="typed", files={"data/in.txt": base64.b64encode(b"filed").decode()},
                   env={"MODE": "demo"})
    assert body["status"] == "success", body["stderr"]
    assert body["result"]["value"] == {"stdin": "typed", "file": "filed", "env": "demo"}
    assert body["backend"] == "unisolated-test"
    assert body["artifacts_skipped"] == []


def test_execute_with_a_shorter_time_limit(contract: TestClient) -> None:
    body = execute(contract, "import time\ndef main():\n    time.sleep(30)\n", limits={"wall_time_s": 0.5})
    assert body["status"] == "resource_limit_exceeded" and body["exit_code"] == -124
    assert "after 0.5s" in body["stderr"]


def test_execute_with_a_smaller_output_cap(contract: TestClient) -> None:
    body = execute(contract, "def main():\n    print('y' * 5000)\n", limits={"output_bytes": 100})
    assert body["resource_limit_type"] == "output"
    assert len(body["stdout"]) <= 100


def test_execute_limits_above_the_maxima_are_422(contract: TestClient) -> None:
    response = contract.post("/v1/execute", json={"code": "def main():\n    return 1\n", "limits": {"wall_time_s": 10}})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "limits"]


def test_execute_nodejs(contract: TestClient, node: None) -> None:
    body = execute(contract, "async function main(args) { console.error('warn'); return [args.x, typeof process] }",
                   language="nodejs", arguments={"x": "y"})
    assert body["status"] == "success", body["stderr"]
    assert body["result"]["value"] == ["y", "object"]
    assert body["stderr"] == "warn\n"


# -- /v1/execute/stream --------------------------------------------------------------------


def test_stream_sends_the_output_then_the_result(contract: TestClient) -> None:
    code = "import sys\ndef main():\n    for i in range(3):\n        print('line', i, flush=True)\n    print('oops', file=sys.stderr)\n    return 'done'\n"
    found = events(contract, {"code": code})
    names = [name for name, _ in found]
    assert names[-1] == "result" and names.count("result") == 1
    assert "".join(data for name, data in found if name == "stdout") == "line 0\nline 1\nline 2\n"
    assert "".join(data for name, data in found if name == "stderr") == "oops\n"
    result = found[-1][1]
    assert tuple(result) == NATIVE_FIELDS
    assert result["result"]["value"] == "done" and result["stdout"] == "line 0\nline 1\nline 2\n"


def test_stream_of_a_timeout_ends_with_its_verdict(contract: TestClient) -> None:
    found = events(contract, {"code": "import time\ndef main():\n    print('a', flush=True)\n    time.sleep(30)\n",
                              "limits": {"wall_time_s": 0.5}})
    assert found[0] == ("stdout", "a\n")
    assert found[-1][0] == "result" and found[-1][1]["exit_code"] == -124


def test_stream_refuses_a_bad_body_before_streaming(contract: TestClient) -> None:
    response = contract.post("/v1/execute/stream", json={"code": "x", "limits": {"wall_time_s": 1e6}})
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/json"


# -- rate limit ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def limited(make_client: Any) -> TestClient:
    return make_client(rate_limit="2/minute")


def test_rate_limit_answers_429_with_retry_after(limited: TestClient) -> None:
    code = base64.b64encode(b"def main():\n    return 1\n").decode()
    assert [limited.post("/run", json={"code_b64": code}).status_code for _ in range(2)] == [200, 200]
    response = limited.post("/v1/execute", json={"code": "def main():\n    return 1\n"})
    assert response.status_code == 429
    assert response.json()["exit_code"] == -429
    assert 1 <= int(response.headers["retry-after"]) <= 60  # a moving window: when the first of the two leaves it
    assert limited.post("/run", content=b"{", headers={"content-type": "application/json"}).status_code == 422
    assert limited.get("/healthz").status_code == 200  # health is never limited
