"""Per-key quotas and the wait queue against real services.

* concurrency: one key at its limit gets 429 + Retry-After (/v1) or 200/-429 (/run), and
  does not hold back another key;
* rate: over the key's rate, 429 + Retry-After on /v1 and RAGFlow's 200/-429 on /run;
* Redis: two service processes sharing one Redis (a throwaway redis-server on loopback)
  enforce one rate and one concurrency limit between them;
* queue: with a pool of 1 (two live sandboxes at most) and a queue of 2, the request after
  the two running and the two waiting is answered at once: 503 on /v1, -10 on /run.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import httpx
import httpx2
import pytest
from api_helpers import Service, run_body
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp_types import TextContent

from tests.redis_server import redis_for_tests

KEYS = {
    "alice": "alice-quota-key-0123456789abcdef",
    "bob": "bob-quota-key-0123456789abcdefgh",
    "carol": "carol-quota-key-0123456789abcdef",
    "dave": "dave-quota-key-0123456789abcdefgh",
}
INLINE_KEYS = ",".join(f"{name}:{key}" for name, key in KEYS.items())
QUICK = "def main():\n    return 'ok'\n"
SLEEPER = "import time\ndef main():\n    time.sleep(5)\n    return 'slept'\n"
DEADLINE_S = 60.0


def key(name: str) -> dict[str, str]:
    return {"X-API-Key": KEYS[name]}


def until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.05)


def python_pool(service: Service) -> dict[str, int]:
    """The Python pools' counts, summed (the light pool and the preloaded one)."""
    pools = httpx.get(f"{service.url}/healthz", timeout=10).json()["pools"]
    found = [p for p in pools if p["name"].startswith("python/")]
    return {key: sum(p[key] for p in found) for key in ("ready", "leased", "waiting")}


def quick_v1(client: httpx.Client, name: str) -> httpx.Response:
    return client.post("/v1/execute", json={"code": QUICK}, headers=key(name))


def quick_run(client: httpx.Client, name: str) -> httpx.Response:
    return client.post("/run", json=run_body(QUICK), headers=key(name))


def assert_v1_limited(response: httpx.Response, why: str) -> None:
    assert response.status_code == 429, response.text
    assert int(response.headers["retry-after"]) >= 1
    assert response.json()["exit_code"] == -429
    assert why in response.json()["detail"], response.text


def assert_run_limited(response: httpx.Response) -> None:
    assert response.status_code == 200, response.text  # RAGFlow's client raises on any other status
    body = response.json()
    assert (body["status"], body["exit_code"]) == ("program_runner_error", -429)
    assert body["detail"] == "Too many requests, please try again later"


@pytest.fixture(scope="module")
def quota(make_service: Any) -> Iterator[Service]:
    service = make_service("quota", {
        "SANDBOX_API_KEYS": INLINE_KEYS,
        "SANDBOX_KEY_MAX_CONCURRENT": "1",
        "SANDBOX_KEY_RATE": "6/minute",
        "SANDBOX_TIMEOUT": "30s",
    })
    yield service
    service.cleanup()


def test_one_key_at_its_concurrency_does_not_hold_back_another(quota: Service) -> None:
    with quota.client() as client, ThreadPoolExecutor(1) as threads:
        sleeper: Future[httpx.Response] = threads.submit(
            client.post, "/v1/execute", json={"code": SLEEPER}, headers=key("alice"))
        until(lambda: python_pool(quota)["leased"] >= 1, "alice's sleeper runs")
        assert_v1_limited(quick_v1(client, "alice"), "already runs 1 execution")
        assert_run_limited(quick_run(client, "alice"))
        other = quick_v1(client, "bob")
        assert other.status_code == 200 and other.json()["result"]["value"] == "ok"
        assert not sleeper.done()  # bob was served while alice was at her limit
        assert sleeper.result().json()["result"]["value"] == "slept"
    with quota.client() as client:
        assert quick_v1(client, "alice").status_code == 200  # her slot came back


def test_a_keys_rate(quota: Service) -> None:
    with quota.client() as client:
        for i in range(6):
            response = quick_run(client, "carol") if i % 2 else quick_v1(client, "carol")
            assert response.status_code == 200 and response.json()["result"]["value"] == "ok", response.text
        native = quick_v1(client, "carol")
        assert_v1_limited(native, "'carol' is over its rate of 6/minute")
        assert 1 <= int(native.headers["retry-after"]) <= 60
        assert_run_limited(quick_run(client, "carol"))
        metrics = client.get("/metrics").text
    assert 'execbox_quota_refusals_total{key="carol",quota="rate"} 2.0' in metrics
    assert all(secret not in metrics for secret in KEYS.values())


def test_mcp_tool_calls_count_against_the_keys_rate(quota: Service) -> None:
    async def calls() -> list[tuple[bool, str]]:
        seen = []
        async with httpx2.AsyncClient(headers=key("dave"), timeout=60) as http:
            async with Client(streamable_http_client(f"{quota.url}/mcp", http_client=http)) as client:
                for _ in range(7):
                    result = await client.call_tool("run_code", {"code": QUICK})
                    text = " ".join(c.text for c in result.content if isinstance(c, TextContent))
                    seen.append((result.is_error, text))
        return seen

    seen = asyncio.run(calls())
    assert [error for error, _ in seen[:6]] == [False] * 6, seen
    error, text = seen[6]
    assert error and "over its rate of 6/minute" in text, seen[6]


# -- two replicas, one Redis ----------------------------------------------------------


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    yield from redis_for_tests(__name__)


def two_replicas(make_service: Any, redis_url: str, name: str, **settings: str) -> Iterator[tuple[Service, Service]]:
    """Two services sharing one Redis, with the test keys, one slot per key and ``settings``."""
    both = {"SANDBOX_API_KEYS": INLINE_KEYS, "SANDBOX_KEY_MAX_CONCURRENT": "1", "SANDBOX_REDIS_URL": redis_url, **settings}
    first, second = make_service(f"{name}-a", both), make_service(f"{name}-b", both)
    yield first, second
    first.cleanup()
    second.cleanup()


@pytest.fixture(scope="module")
def replicas(make_service: Any, redis_url: str) -> Iterator[tuple[Service, Service]]:
    yield from two_replicas(make_service, redis_url, "replica", SANDBOX_KEY_RATE="4/minute",
                            SANDBOX_EXECUTOR_MANAGER_POOL_SIZE="1", SANDBOX_TIMEOUT="30s")  # fmt: skip


def test_two_replicas_enforce_one_rate(replicas: tuple[Service, Service]) -> None:
    first, second = replicas
    with first.client() as a, second.client() as b:
        for client in (a, b, a, b):  # 4/minute in all, not 4 each
            assert quick_v1(client, "carol").status_code == 200
        assert_v1_limited(quick_v1(a, "carol"), "over its rate of 4/minute")
        assert_run_limited(quick_run(b, "carol"))
        assert quick_v1(b, "bob").status_code == 200  # another key, its own budget


def test_two_replicas_enforce_one_concurrency(replicas: tuple[Service, Service]) -> None:
    first, second = replicas
    with first.client() as a, second.client() as b, ThreadPoolExecutor(1) as threads:
        sleeper = threads.submit(a.post, "/v1/execute", json={"code": SLEEPER}, headers=key("alice"))
        until(lambda: python_pool(first)["leased"] >= 1, "alice's sleeper runs on replica a")
        assert_v1_limited(quick_v1(b, "alice"), "already runs 1 execution")  # her slot is held on a
        assert sleeper.result().json()["result"]["value"] == "slept"
        assert quick_v1(b, "alice").status_code == 200  # given back, on the other replica too


# -- the wait queue -------------------------------------------------------------------


@pytest.fixture(scope="module")
def queued(make_service: Any) -> Iterator[Service]:
    service = make_service("queue", {
        "SANDBOX_EXECUTOR_MANAGER_POOL_SIZE": "1",
        "SANDBOX_QUEUE_MAX": "2",
        "SANDBOX_POOL_WAIT": "10m",
        "SANDBOX_TIMEOUT": "30s",
        "SANDBOX_LANGUAGES": "python",
    })
    yield service
    service.cleanup()


def test_a_request_beyond_the_queue_is_answered_at_once(queued: Service) -> None:
    """Two sleepers hold the pool's two live sandboxes, two requests wait: the next is
    refused at once (a wait would last until a sandbox is free, far longer than its answer)."""
    limits = httpx.Limits(max_connections=8)
    with queued.client(limits=limits) as client, ThreadPoolExecutor(4) as threads:
        running = [threads.submit(client.post, "/v1/execute", json={"code": SLEEPER}) for _ in range(2)]
        until(lambda: python_pool(queued)["leased"] == 2, "two sleepers run")
        waiting = [threads.submit(client.post, "/run", json=run_body(QUICK)) for _ in range(2)]
        until(lambda: python_pool(queued)["waiting"] == 2, "two requests wait")
        native = client.post("/v1/execute", json={"code": QUICK})
        assert native.status_code == 503, native.text
        assert native.headers["retry-after"] == "1"
        run = client.post("/run", json=run_body(QUICK))
        assert run.status_code == 200
        assert (run.json()["exit_code"], run.json()["detail"]) == (-10, "no_available_container")
        assert "Container pool is busy" in run.json()["stderr"]
        assert not any(f.done() for f in (*running, *waiting))  # refused while the others still ran and waited
        for future in waiting:  # the two that queued are served
            assert future.result().json()["result"]["value"] == "ok"
        for future in running:
            assert future.result().json()["result"]["value"] == "slept"


@pytest.fixture(scope="module")
def one_slot_replicas(make_service: Any, redis_url: str) -> Iterator[tuple[Service, Service]]:
    """Two replicas, one Redis: one slot per key, and a rate that never binds."""
    yield from two_replicas(make_service, redis_url, "slot", SANDBOX_KEY_RATE="1000/minute",
                            SANDBOX_EXECUTOR_MANAGER_POOL_SIZE="2")  # fmt: skip


def test_a_slot_is_free_once_its_answer_arrived(one_slot_replicas: tuple[Service, Service]) -> None:
    """With one slot per key, requests sent one after the other (each once the previous answer
    arrived), alternately to either replica, are never refused: a slot is given back before
    its answer is sent, not after."""
    first, second = one_slot_replicas
    with first.client() as a, second.client() as b:
        for index in range(24):
            client = (a, b)[index % 2]
            response = quick_run(client, "alice") if index % 3 else quick_v1(client, "alice")
            assert response.status_code == 200, response.text
            assert response.json()["exit_code"] == 0, (index, response.text)
