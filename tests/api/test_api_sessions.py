"""Sessions over HTTP against a real service: the wire shapes of every call, raw file
bodies, and the errors (404, 400, 429 with Retry-After) a client sees."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from api_helpers import Service


@pytest.fixture(scope="module")
def service(make_service: Any) -> Iterator[Service]:
    service = make_service(
        "sessions",
        {"SANDBOX_EXECUTOR_MANAGER_POOL_SIZE": "1", "SANDBOX_MAX_SESSIONS": "3", "SANDBOX_CODE_CHECK": "guard"},
    )
    yield service
    service.cleanup()


@pytest.fixture
def client(service: Service) -> Iterator[httpx.Client]:
    with service.client() as client:
        yield client
        for session in client.get("/v1/sessions").json()["sessions"]:
            client.delete(f"/v1/sessions/{session['id']}")


def _create(client: httpx.Client, **body: Any) -> dict[str, Any]:
    response = client.post("/v1/sessions", json={"language": "python", **body})
    assert response.status_code == 201, response.text
    return response.json()


def test_a_python_session_end_to_end(client: httpx.Client) -> None:
    created = _create(client, env={"GREETING": "hi"})
    assert set(created) >= {"id", "language", "created_at", "expires_at", "idle_timeout_s", "backend"}
    assert created["language"] == "python" and created["created_at"].endswith(("Z", "+00:00"))
    sid = created["id"]
    csv = b"city,temp\nOslo,3\nRome,18\n"
    put = client.put(f"/v1/sessions/{sid}/files/weather.csv", content=csv)
    assert put.status_code == 201 and put.json() == {"path": "weather.csv", "size": len(csv)}
    first = client.post(f"/v1/sessions/{sid}/execute", json={"code": "import pandas as pd\ndf = pd.read_csv('weather.csv')\nlen(df)"})
    assert first.status_code == 200, first.text
    assert first.json()["status"] == "success" and first.json()["result"] == {"present": True, "value": 2, "type": "json"}
    second = client.post(f"/v1/sessions/{sid}/execute", json={"code": "import os\nprint(os.environ['GREETING'])\ndf['temp'].mean()"})
    assert second.json()["result"]["value"] == 10.5 and second.json()["stdout"] == "hi\n"
    plot = client.post(f"/v1/sessions/{sid}/execute", json={"code": (
        "import matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot as plt\n"
        "df.plot(x='city', y='temp')\nplt.savefig('artifacts/temp.png')"
    )})
    artifacts = plot.json()["artifacts"]
    assert [a["name"] for a in artifacts] == ["temp.png"] and artifacts[0]["mime_type"] == "image/png"
    described = client.get(f"/v1/sessions/{sid}").json()
    assert described["executions"] == 3 and "last_used_at" in described
    listed = client.get(f"/v1/sessions/{sid}/files").json()["files"]
    assert {"path": "weather.csv", "size": len(csv)} in listed and any(f["path"] == "artifacts/temp.png" for f in listed)
    assert client.delete(f"/v1/sessions/{sid}").status_code == 204
    gone = client.post(f"/v1/sessions/{sid}/execute", json={"code": "1"})
    assert gone.status_code == 404 and isinstance(gone.json()["detail"], str)


def test_a_nodejs_session_end_to_end(client: httpx.Client) -> None:
    sid = _create(client, language="nodejs")["id"]
    assert client.post(f"/v1/sessions/{sid}/execute", json={"code": "const rows = [1, 2, 3]"}).json()["result"]["present"] is False
    total = client.post(f"/v1/sessions/{sid}/execute", json={"code": "const s = await Promise.resolve(rows.reduce((a, b) => a + b))\ns"})
    assert total.json()["result"]["value"] == 6, total.text
    client.post(f"/v1/sessions/{sid}/execute", json={"code": "require('fs').writeFileSync('out.json', JSON.stringify({s}))"})
    download = client.get(f"/v1/sessions/{sid}/files/out.json")
    assert download.status_code == 200 and download.headers["content-type"] == "application/octet-stream"
    assert download.content == b'{"s":6}'


def test_files_are_raw_bytes_both_ways(client: httpx.Client) -> None:
    sid = _create(client)["id"]
    data = os.urandom(300_000)
    assert client.put(f"/v1/sessions/{sid}/files/deep/dir/blob.bin", content=data).status_code == 201
    digest = client.post(f"/v1/sessions/{sid}/execute", json={
        "code": "import hashlib\nhashlib.sha256(open('deep/dir/blob.bin', 'rb').read()).hexdigest()"
    }).json()["result"]["value"]
    assert digest == hashlib.sha256(data).hexdigest()
    assert client.get(f"/v1/sessions/{sid}/files/deep/dir/blob.bin").content == data


@pytest.mark.parametrize("path", ["..%2Fescape", "a/..%2F..%2Fb", "%2Fetc%2Fpasswd", "link/x"])
def test_bad_paths_are_400(client: httpx.Client, path: str) -> None:
    sid = _create(client)["id"]
    client.post(f"/v1/sessions/{sid}/execute", json={"code": "import os\nos.symlink('/etc', 'link')"})
    put = client.put(f"/v1/sessions/{sid}/files/{path}", content=b"x")
    get = client.get(f"/v1/sessions/{sid}/files/{path}")
    assert put.status_code == 400 and get.status_code == 400, (put.text, get.text)
    assert isinstance(put.json()["detail"], str)


def test_unknown_session_and_missing_file_are_404(client: httpx.Client) -> None:
    for method, path in [("GET", "/v1/sessions/nope"), ("DELETE", "/v1/sessions/nope"),
                         ("POST", "/v1/sessions/nope/execute"), ("GET", "/v1/sessions/nope/files")]:
        response = client.request(method, path, json={"code": "1"} if method == "POST" else None)
        assert response.status_code == 404, (method, path, response.text)
    sid = _create(client)["id"]
    assert client.get(f"/v1/sessions/{sid}/files/missing.txt").status_code == 404


def test_invalid_bodies_are_422(client: httpx.Client) -> None:
    assert client.post("/v1/sessions", json={"language": "cobol"}).status_code == 422
    assert client.post("/v1/sessions", json={"language": "python", "unknown": 1}).status_code == 422
    sid = _create(client)["id"]
    assert client.post(f"/v1/sessions/{sid}/execute", json={"cod": "1"}).status_code == 422
    too_long = client.post(f"/v1/sessions/{sid}/execute", json={"code": "1", "timeout_s": 10**5})
    assert too_long.status_code in (400, 422), too_long.text


def test_max_sessions_is_429_with_retry_after(client: httpx.Client) -> None:
    for _ in range(3):
        _create(client)
    refused = client.post("/v1/sessions", json={"language": "python"})
    assert refused.status_code == 429, refused.text
    assert float(refused.headers["retry-after"]) > 0
