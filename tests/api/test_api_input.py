"""Bad input gets a clear 4xx, never a 500 (issue 3, item 1)."""

from __future__ import annotations

import base64

import httpx
import pytest
from api_helpers import MAX_BODY_SIZE, MAX_CODE_SIZE, b64


def post(client: httpx.Client, body: object) -> httpx.Response:
    return client.post("/run", json=body)


def assert_422_naming(response: httpx.Response, field: str) -> None:
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert any(field in [str(part) for part in error["loc"]] for error in detail), detail


def test_invalid_base64_is_422(client: httpx.Client) -> None:
    response = post(client, {"code_b64": "this is not base64!"})
    assert_422_naming(response, "code_b64")
    assert "base64" in response.text


def test_invalid_utf8_is_422(client: httpx.Client) -> None:
    response = post(client, {"code_b64": base64.b64encode(b"def main():\n    return '\xff\xfe'\n").decode()})
    assert_422_naming(response, "code_b64")
    assert "UTF-8" in response.text


def test_missing_code_is_422(client: httpx.Client) -> None:
    assert_422_naming(post(client, {"language": "python"}), "code_b64")


@pytest.mark.parametrize("language", ["ruby", "cobol", "", None, 7])
def test_unknown_language_is_422(client: httpx.Client, language: object) -> None:
    assert_422_naming(post(client, {"code_b64": b64("def main():\n    return 1\n"), "language": language}), "language")


@pytest.mark.parametrize("arguments", [[1, 2], "a=1", 3, None])
def test_arguments_not_an_object_is_422(client: httpx.Client, arguments: object) -> None:
    body = {"code_b64": b64("def main():\n    return 1\n"), "arguments": arguments}
    assert_422_naming(post(client, body), "arguments")


@pytest.mark.parametrize("raw", [b'{"code_b64": ', b"not json at all", b""])
def test_malformed_json_is_422(client: httpx.Client, raw: bytes) -> None:
    response = client.post("/run", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text


def test_body_that_is_not_an_object_is_422(client: httpx.Client) -> None:
    assert client.post("/run", json=["code_b64"]).status_code == 422


def test_code_over_the_limit_is_413(client: httpx.Client) -> None:
    code = "def main():\n    return 1\n" + "#" * MAX_CODE_SIZE + "\n"
    response = post(client, {"code_b64": b64(code)})
    assert response.status_code == 413, response.text
    assert "SANDBOX_MAX_CODE_SIZE" in response.json()["detail"]


def test_code_just_under_the_limit_runs(client: httpx.Client) -> None:
    head = "def main():\n    return 'big'\n"
    code = head + "#" * (MAX_CODE_SIZE - len(head) - 1) + "\n"
    assert len(code.encode()) == MAX_CODE_SIZE
    response = post(client, {"code_b64": b64(code)})
    assert response.status_code == 200
    assert response.json()["result"]["value"] == "big"


def test_huge_body_is_413_before_it_is_parsed(client: httpx.Client) -> None:
    response = client.post("/run", content=b"x" * (MAX_BODY_SIZE + 1), headers={"content-type": "application/json"})
    assert response.status_code == 413, response.text[:200]


def test_a_body_at_the_cap_is_read(client: httpx.Client) -> None:
    body = b'{"code_b64": "' + b64("def main():\n    return 1\n").encode() + b'"}'
    padded = body + b" " * (MAX_BODY_SIZE - len(body))  # JSON allows trailing whitespace
    response = client.post("/run", content=padded, headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text[:200]
    assert response.json()["result"]["value"] == 1


def test_native_code_over_the_limit_is_413(client: httpx.Client) -> None:
    code = "def main():\n    return 1\n" + "#" * MAX_CODE_SIZE
    assert client.post("/v1/execute", json={"code": code}).status_code == 413


def test_wrong_method_and_path(client: httpx.Client) -> None:
    assert client.get("/run").status_code == 405
    assert client.post("/nope", json={}).status_code == 404
