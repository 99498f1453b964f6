"""Health probes, offline docs, request ids and the JSON log lines (in-process)."""

from __future__ import annotations

import io
import json
import logging
import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from execbox.api.logs import (
    REQUEST_ID_HEADER,
    JSONLogFormatter,
    RequestIDFilter,
    log_config,
)
from execbox.isolation.base import IsolationBackend

# -- health ----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/healthz", "/livez"])
def test_head_answers_like_get_without_a_body(contract: TestClient, path: str) -> None:
    got, head = contract.get(path), contract.head(path)
    assert got.status_code == head.status_code == 200
    assert got.json()["status"] == "ok"
    assert head.content == b""


def test_liveness_is_not_readiness(tmp_path: Path, broken_backend: IsolationBackend) -> None:
    from execbox.api.app import create_app
    from execbox.service.executor import Executor
    from execbox.settings import Settings

    for runtime in ("python", "nodejs"):
        (tmp_path / "runtimes" / runtime).mkdir(parents=True)
    settings = Settings.load(env_file=None, state_dir=tmp_path)
    with TestClient(create_app(settings, Executor(settings, backend=broken_backend, pool_size=1))) as client:
        ready = client.get("/healthz")
        assert ready.status_code == 503 and ready.json()["status"] == "starting"
        assert client.head("/healthz").status_code == 503
        assert client.get("/livez").status_code == 200
        assert client.head("/livez").status_code == 200


# -- /docs without outside network -------------------------------------------------------------

_REFERENCE = re.compile(r"""(?:src|href|url)\s*[=:]\s*['"]([^'"]+)['"]""")


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_reference_nothing_outside_and_their_assets_load(contract: TestClient, page: str) -> None:
    response = contract.get(page)
    assert response.status_code == 200 and "text/html" in response.headers["content-type"]
    html = response.text
    assert "http://" not in html and "https://" not in html and "//cdn" not in html, html
    references = set(_REFERENCE.findall(html))
    assets = {ref for ref in references if ref.startswith("/docs-assets/")}
    assert len(assets) >= (3 if page == "/docs" else 2), references  # script, style sheet, icon
    assert "/openapi.json" in html
    for asset in sorted(assets):
        loaded = contract.get(asset)
        assert loaded.status_code == 200, asset
        assert len(loaded.content) > 1000 or asset.endswith(".png"), asset
    types = {contract.get(asset).headers["content-type"].split(";")[0] for asset in assets}
    assert "text/javascript" in types or "application/javascript" in types


def test_swagger_ui_can_render_the_schema_version(contract: TestClient) -> None:
    """FastAPI writes OpenAPI 3.1, which Swagger UI renders from version 5 on."""
    assert contract.get("/openapi.json").json()["openapi"].startswith("3.1")
    bundle = contract.get("/docs-assets/swagger-ui-bundle.js").text
    assert re.search(r"\b5\.\d+\.\d+\b", bundle)
    assert contract.get("/docs/oauth2-redirect").status_code == 200


# -- request ids ----------------------------------------------------------------------------


def test_a_sane_request_id_is_returned_as_given(contract: TestClient) -> None:
    response = contract.get("/livez", headers={REQUEST_ID_HEADER: "rag-flow.42:abc_DEF"})
    assert response.headers[REQUEST_ID_HEADER] == "rag-flow.42:abc_DEF"


@pytest.mark.parametrize("given", [None, "", "has space", "x" * 129, "semi;colon", "quote\"", "é".encode()])
def test_otherwise_one_is_made(contract: TestClient, given: str | bytes | None) -> None:
    headers = {} if given is None else {REQUEST_ID_HEADER: given}
    first = contract.get("/livez", headers=headers).headers[REQUEST_ID_HEADER]
    second = contract.get("/livez", headers=headers).headers[REQUEST_ID_HEADER]
    assert re.fullmatch(r"[0-9a-f]{32}", first) and first != second


def test_errors_carry_the_request_id_too(contract: TestClient) -> None:
    response = contract.post("/run", json={"code_b64": "!"}, headers={REQUEST_ID_HEADER: "bad-one"})
    assert response.status_code == 422 and response.headers[REQUEST_ID_HEADER] == "bad-one"
    assert contract.get("/nowhere", headers={REQUEST_ID_HEADER: "lost"}).headers[REQUEST_ID_HEADER] == "lost"


# -- log lines ------------------------------------------------------------------------------


@pytest.fixture()
def log_lines() -> Iterator[Callable[[], list[dict[str, Any]]]]:
    """The JSON lines execbox logs meanwhile, formatted as ``execbox serve`` formats them."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JSONLogFormatter())
    handler.addFilter(RequestIDFilter())
    logger = logging.getLogger("execbox")
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)


def _run(client: TestClient, code: str, request_id: str) -> dict[str, Any]:
    import base64

    response = client.post("/run", json={"code_b64": base64.b64encode(code.encode()).decode()},
                           headers={REQUEST_ID_HEADER: request_id})
    assert response.status_code == 200
    return dict(response.json())


def test_the_execution_line_carries_the_request_id_and_no_code_or_output(
    contract: TestClient, log_lines: Callable[[], list[dict[str, Any]]]
) -> None:
    marker, request_id = uuid.uuid4().hex, f"req-{uuid.uuid4().hex[:8]}"
    body = _run(contract, f"def main():\n    # {marker}-code\n    print('{marker}-output')\n    return '{marker}-result'\n",
                request_id)
    assert body["status"] == "success"
    lines = log_lines()
    executions = [line for line in lines if line["logger"] == "execbox.executions"]
    assert len(executions) == 1, lines
    line = executions[0]
    assert line["message"] == "execution" and line["request_id"] == request_id and line["level"] == "INFO"
    assert line["execution"]["status"] == "success" and line["execution"]["language"] == "python"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+\+00:00", line["time"])
    assert marker not in json.dumps(lines)


def test_a_blocked_request_logs_which_rule(contract: TestClient, log_lines: Callable[[], list[dict[str, Any]]]) -> None:
    body = _run(contract, "import subprocess\ndef main():\n    return 1\n", "blocked-1")
    assert body["exit_code"] == -999
    rules = re.findall(r"\[([\w-]+)\]$", body["stderr"], re.MULTILINE)
    assert rules
    (line,) = [line for line in log_lines() if line["logger"] == "execbox.executions"]
    assert line["request_id"] == "blocked-1"
    assert line["execution"]["code_check"] == [{"line": 1, "rule": rule} for rule in rules]
    assert "subprocess" not in json.dumps(line)  # the rule, not the code


def test_uvicorns_lines_are_json_too() -> None:
    import logging.config

    config = log_config("info")
    stream = io.StringIO()
    config["handlers"]["stderr"].pop("stream")
    config["handlers"]["stderr"]["class"] = "logging.StreamHandler"
    saved = {name: (logging.getLogger(name).handlers[:], logging.getLogger(name).level, logging.getLogger(name).propagate)
             for name in ("", "uvicorn", "uvicorn.error", "uvicorn.access", "execbox")}
    try:
        logging.config.dictConfig(config)
        root = logging.getLogger()
        root.handlers[0].setStream(stream)  # type: ignore[attr-defined]
        logging.getLogger("uvicorn.error").info("Started server process [%d]", 1)
        logging.getLogger("uvicorn.access").info('%s - "%s %s HTTP/%s" %d', "127.0.0.1:1", "GET", "/livez", "1.1", 200)
    finally:
        for name, (handlers, level, propagate) in saved.items():
            logger = logging.getLogger(name)
            logger.handlers[:] = handlers
            logger.setLevel(level)
            logger.propagate = propagate
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(line["logger"], line["message"]) for line in lines] == [
        ("uvicorn.error", "Started server process [1]"),
        ("uvicorn.access", '127.0.0.1:1 - "GET /livez HTTP/1.1" 200'),
    ]
