"""``/metrics``: scraped and parsed with prometheus_client's own parser; the series move
with the requests (the unisolated test backend, in-process)."""

from __future__ import annotations

import base64
from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

import execbox

POOL = "python/unisolated-test"
Labels = dict[str, str]


def scrape(client: TestClient) -> dict[str, list[tuple[str, Labels, float]]]:
    """Family name -> its samples (name, labels, value)."""
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        family.name: [(s.name, dict(s.labels), s.value) for s in family.samples]
        for family in text_string_to_metric_families(response.text)
    }


def value(families: dict[str, list[tuple[str, Labels, float]]], sample: str, **labels: str) -> float:
    """The value of ``sample`` whose labels include ``labels`` (0 when there is none yet)."""
    for family in families.values():
        for name, have, number in family:
            if name == sample and labels.items() <= have.items():
                return number
    return 0.0


@pytest.fixture(scope="module")
def client(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client(rate_limit="1000/minute")


def run(client: TestClient, code: str) -> int:
    return client.post("/run", json={"code_b64": base64.b64encode(code.encode()).decode()}).status_code


def test_executions_are_counted_by_language_backend_and_verdict(client: TestClient) -> None:
    before = scrape(client)
    assert run(client, "def main():\n    return 1\n") == 200
    assert run(client, "def main():\n    raise ValueError\n") == 200
    after = scrape(client)
    for status in ("success", "program_error"):
        labels = {"language": "python", "backend": "unisolated-test", "status": status}
        assert value(after, "execbox_executions_total", **labels) == value(before, "execbox_executions_total", **labels) + 1
    count = "execbox_execution_seconds_count"
    labels = {"language": "python", "backend": "unisolated-test"}
    assert value(after, count, **labels) == value(before, count, **labels) + 2


def test_http_requests_are_counted_by_route_template_and_status(client: TestClient) -> None:
    before = scrape(client)
    assert run(client, "def main():\n    return 1\n") == 200
    assert client.post("/run", json={"code_b64": "!"}).status_code == 422
    assert client.get("/no/such/path").status_code == 404
    client.get("/v1/sessions/some-id")
    after = scrape(client)
    name = "execbox_http_requests_total"
    for labels in ({"method": "POST", "route": "/run", "status": "200"}, {"method": "POST", "route": "/run", "status": "422"},
                   {"method": "GET", "route": "unmatched", "status": "404"}):
        assert value(after, name, **labels) == value(before, name, **labels) + 1, labels
    templated = [labels for sample, labels, _ in after["execbox_http_requests"] if sample == name]
    assert any(labels["route"] == "/v1/sessions/{session_id}" for labels in templated)
    assert not any("some-id" in labels["route"] for labels in templated)  # templates, never raw paths
    duration = "execbox_http_request_duration_seconds_count"
    assert value(after, duration, method="POST", route="/run") >= value(before, duration, method="POST", route="/run") + 2


def test_pool_state_and_sandbox_counters(client: TestClient) -> None:
    before = scrape(client)
    assert run(client, "def main():\n    return 1\n") == 200
    after = scrape(client)
    for gauge in ("execbox_pool_ready", "execbox_pool_leased", "execbox_pool_creating", "execbox_pool_waiting"):
        assert any(labels == {"pool": POOL} for _, labels, _ in after[gauge]), gauge
    assert value(after, "execbox_pool_size", pool=POOL) == 1
    assert value(after, "execbox_pool_leased", pool=POOL) == 0  # the answer came: its sandbox is back
    assert value(after, "execbox_sandboxes_recycled_total", pool=POOL) == value(
        before, "execbox_sandboxes_recycled_total", pool=POOL
    ) + 1
    assert value(after, "execbox_sandboxes_created_total", pool=POOL) >= 1
    assert "execbox_sandboxes_failed" in after
    wait = "execbox_pool_wait_seconds_count"
    assert value(after, wait, pool=POOL) == value(before, wait, pool=POOL) + 1


def test_a_blocked_request_is_counted_by_rule(client: TestClient) -> None:
    before = scrape(client)
    assert run(client, "import subprocess\ndef main():\n    return 1\n") == 200
    after = scrape(client)
    rules = [labels["rule"] for sample, labels, _ in after["execbox_code_check_blocked"] if sample.endswith("_total")]
    assert rules, after.get("execbox_code_check_blocked")
    rule = rules[0]
    name = "execbox_code_check_blocked_total"
    assert value(after, name, language="python", rule=rule) == value(before, name, language="python", rule=rule) + 1
    blocked = {"language": "python", "status": "program_runner_error"}
    assert value(after, "execbox_executions_total", **blocked) == value(before, "execbox_executions_total", **blocked) + 1


def test_build_info(client: TestClient) -> None:
    samples = scrape(client)["execbox_build_info"]
    assert [(name, labels["version"], number) for name, labels, number in samples] == [
        ("execbox_build_info", execbox.__version__, 1.0)
    ]
    assert samples[0][1]["runsc_version"] == ""  # not gVisor


def test_a_rate_limited_request_leaves_a_trace(make_client: Callable[..., TestClient]) -> None:
    limited = make_client(rate_limit="1/hour")
    assert run(limited, "def main():\n    return 1\n") == 200
    assert limited.post("/v1/execute", json={"code": "def main():\n    return 1\n"}).status_code == 429
    assert run(limited, "def main():\n    return 1\n") == 200  # RAGFlow's answer: HTTP 200 with -429
    families = scrape(limited)
    assert value(families, "execbox_http_requests_total", method="POST", route="/v1/execute", status="429") == 1
    assert value(families, "execbox_quota_refusals_total", key="", quota="address_rate") == 2


def test_the_package_cache_is_in_the_metrics() -> None:
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from execbox.service.metrics import ServiceMetrics

    registry = CollectorRegistry()
    metrics = ServiceMetrics(registry)
    stats = {"hits": 3, "installs": 1, "refused": 2, "failures": 0, "evictions": 1, "layers": 4, "size_bytes": 1234}
    metrics.read_packages(lambda: stats)
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}
    served = {s.labels["outcome"]: s.value for s in families["execbox_package_sets"].samples if s.name.endswith("_total")}
    assert served == {"hit": 3.0, "install": 1.0, "refused": 2.0, "failure": 0.0}
    assert families["execbox_package_layers"].samples[0].value == 4
    assert families["execbox_package_cache_bytes"].samples[0].value == 1234
    assert families["execbox_package_layers_evicted"].samples[0].value == 1
