"""``packages`` over HTTP, in-process (the unisolated test backend): what is refused before
anything is installed is a 422 naming ``packages`` (a 400 for a session), streaming or not,
and a request without packages is untouched. Installing for real is tests/contract's."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient


@pytest.fixture(scope="module")
def off(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client()


@pytest.fixture(scope="module")
def allowlist(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client(packages="tabulate,nodejs:is-number")


def _refused(response: object, message: str) -> None:
    assert response.status_code == 422, response.text  # type: ignore[attr-defined]
    [error] = response.json()["detail"]  # type: ignore[attr-defined]
    assert error["loc"] == ["body", "packages"]
    assert message in error["msg"]


@pytest.mark.parametrize("path", ["/v1/execute", "/v1/execute/stream"])
def test_packages_are_refused_when_off_naming_the_setting(off: TestClient, path: str) -> None:
    response = off.post(path, json={"code": "def main():\n    return 1\n", "packages": ["tabulate"]})
    _refused(response, "SANDBOX_PACKAGES=off")


def test_an_allowlist_refuses_other_names_and_other_languages(allowlist: TestClient) -> None:
    code = "def main():\n    return 1\n"
    _refused(allowlist.post("/v1/execute", json={"code": code, "packages": ["tabulate", "six"]}), ": six")
    _refused(allowlist.post("/v1/execute", json={"code": code, "packages": ["is-number"]}), ": is-number")


def test_a_malformed_requirement_is_refused(allowlist: TestClient) -> None:
    response = allowlist.post("/v1/execute", json={"code": "x", "packages": ["tabulate @ https://evil/t.whl"]})
    _refused(response, "URLs, paths and options are refused")
    too_many = allowlist.post("/v1/execute", json={"code": "x", "packages": ["tabulate"] * 33})
    assert too_many.status_code == 422 and too_many.json()["detail"][0]["loc"] == ["body", "packages"]


def test_a_session_with_packages_refused_is_a_400(off: TestClient) -> None:
    response = off.post("/v1/sessions", json={"language": "python", "packages": ["tabulate"]})
    assert response.status_code == 400, response.text
    assert "SANDBOX_PACKAGES=off" in response.json()["detail"]


def test_a_request_without_packages_runs_as_before(allowlist: TestClient) -> None:
    response = allowlist.post("/v1/execute", json={"code": "def main():\n    return 2\n", "packages": []})
    assert response.status_code == 200 and response.json()["result"]["value"] == 2
