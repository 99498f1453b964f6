"""Packages per request over HTTP against a real service (SANDBOX_PACKAGES=any), installed
for real from PyPI and npm: what a client sees on /v1/execute, its stream and sessions."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from api_helpers import Service

_TABLE = "from tabulate import tabulate\ndef main():\n    return tabulate([[1, 2]], headers=['a', 'b'], tablefmt='plain')\n"


@pytest.fixture(scope="module")
def service(make_service: Any) -> Iterator[Service]:
    service = make_service("packages", {"SANDBOX_EXECUTOR_MANAGER_POOL_SIZE": "1", "SANDBOX_PACKAGES": "any"})
    yield service
    service.cleanup()


@pytest.fixture
def client(service: Service) -> Iterator[httpx.Client]:
    with service.client(timeout=300.0) as client:
        yield client


def _refused(response: httpx.Response, message: str) -> None:
    assert response.status_code == 422, response.text
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", "packages"] and message in error["msg"]


def test_execute_with_a_package_and_without(client: httpx.Client) -> None:
    response = client.post("/v1/execute", json={"code": _TABLE, "packages": ["tabulate==0.9.0"]})
    assert response.status_code == 200 and response.json()["status"] == "success", response.text
    assert response.json()["result"]["value"].split() == ["a", "b", "1", "2"]
    without = client.post("/v1/execute", json={"code": _TABLE}).json()
    assert without["status"] == "program_error" and "No module named 'tabulate'" in without["stderr"]


def test_refusals_are_422_naming_packages_before_a_stream_begins(client: httpx.Client) -> None:
    code = "def main():\n    return 1\n"
    _refused(client.post("/v1/execute", json={"code": code, "packages": ["docopt==0.6.2"]}), "only source distributions")
    _refused(client.post("/v1/execute/stream", json={"code": code, "packages": ["execbox-no-such-package-3b1f"]}),
             "does not exist on the package index")  # fmt: skip
    _refused(client.post("/v1/execute", json={"code": code, "packages": ["git+https://example.com/x.git"]}),
             "URLs, paths and options are refused")  # fmt: skip


def test_the_stream_of_a_node_request_with_a_package(client: httpx.Client) -> None:
    body = {"language": "nodejs", "code": "function main() { console.log(require('is-number')(3)); return 1 }",
            "packages": ["is-number@7.0.0"]}  # fmt: skip
    with client.stream("POST", "/v1/execute/stream", json=body) as response:
        assert response.status_code == 200
        text = response.read().decode()
    result = json.loads(text.split("event: result\ndata: ", 1)[1].split("\n", 1)[0])
    assert result["status"] == "success" and result["stdout"] == "true\n", text


def test_a_session_with_packages(client: httpx.Client) -> None:
    created = client.post("/v1/sessions", json={"language": "python", "packages": ["tabulate==0.9.0"]})
    assert created.status_code == 201, created.text
    session = created.json()["id"]
    try:
        cell = client.post(f"/v1/sessions/{session}/execute", json={"code": "import tabulate\ntabulate.__version__"})
        assert cell.status_code == 200 and cell.json()["result"]["value"] == "0.9.0", cell.text
    finally:
        client.delete(f"/v1/sessions/{session}")
    refused = client.post("/v1/sessions", json={"language": "python", "packages": ["execbox-no-such-package-3b1f"]})
    assert refused.status_code == 400 and "does not exist" in refused.json()["detail"]
