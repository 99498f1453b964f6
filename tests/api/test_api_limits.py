"""The special exit codes that need a service configured for them (docs/api.md section 1):
time limit (-124), pool busy (-10), rate limited (-429), internal fault (-3); and the
verdicts only reachable with the static check off (disallowed syscall, nonzero exit)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from threading import Barrier
from typing import Any

import httpx
import pytest
from api_helpers import BACKEND, Service, run_body


@pytest.fixture(scope="module")
def tight(make_service: Any) -> Iterator[Service]:
    """One warm sandbox per language (at most two live), a 0.5 s pool wait, a 2 s time
    limit, and the static check off so that raw verdicts can be provoked."""
    service = make_service("tight", {
        "SANDBOX_EXECUTOR_MANAGER_POOL_SIZE": "1",
        "SANDBOX_POOL_WAIT": "500ms",
        "SANDBOX_TIMEOUT": "2s",
        "SANDBOX_CODE_CHECK": "off",
    })
    yield service
    service.cleanup()


def run(service: Service, code: str, **kwargs: Any) -> dict[str, Any]:
    with service.client() as client:
        response = client.post("/run", json=run_body(code, **kwargs))
    assert response.status_code == 200, response.text
    return response.json()


def test_time_limit_is_minus_124_with_partial_output(tight: Service) -> None:
    code = (
        "import time\ndef main():\n    print('before the loop', flush=True)\n"
        "    while True:\n        time.sleep(0.05)\n"
    )
    started = time.monotonic()
    body = run(tight, code)
    elapsed = time.monotonic() - started
    assert body["status"] == "resource_limit_exceeded", body
    assert body["resource_limit_type"] == "time"
    assert body["exit_code"] == -124
    assert "Execution timeout" in body["stderr"]
    assert body["stdout"] == "before the loop\n"
    assert 1.9 <= elapsed < 10, elapsed


def test_busy_cpu_loop_hits_the_time_limit_too(tight: Service) -> None:
    body = run(tight, "def main():\n    while True:\n        pass\n", language="python")
    assert body["exit_code"] == -124
    body = run(tight, "function main() {\n  for (;;) {}\n}\n", language="nodejs")
    assert body["exit_code"] == -124


def test_pool_busy_is_minus_10(tight: Service) -> None:
    """8 simultaneous 1 s sleepers against at most 2 live sandboxes and a 0.5 s wait: each
    gets 200 and either its own result or the pool-busy answer; some get each."""
    count = 8
    barrier = Barrier(count)
    code = "import time\ndef main(i):\n    time.sleep(1.0)\n    return i * 10\n"

    with httpx.Client(base_url=tight.url, timeout=60, limits=httpx.Limits(max_connections=count)) as client:
        def one(i: int) -> tuple[int, dict[str, Any]]:
            barrier.wait()
            response = client.post("/run", json=run_body(code, arguments={"i": i}))
            return response.status_code, response.json()

        with ThreadPoolExecutor(count) as threads:
            answers = list(threads.map(one, range(count)))

    busy = 0
    for i, (status_code, body) in enumerate(answers):
        assert status_code == 200, body
        if body["status"] == "success":
            assert body["result"]["value"] == i * 10
        else:
            busy += 1
            assert body["status"] == "program_runner_error", body
            assert body["exit_code"] == -10
            assert body["detail"] == "no_available_container"
            assert "Container pool is busy" in body["stderr"]
    assert 0 < busy < count, f"{busy} of {count} were busy"


def test_pool_recovers_after_a_burst(tight: Service) -> None:
    time.sleep(1.5)  # the sleepers of the previous test are done
    body = run(tight, "def main():\n    return 'still serving'\n")
    assert body["result"]["value"] == "still serving"


def test_os_exit_is_a_nonzero_exit_runtime_error(tight: Service) -> None:
    body = run(tight, "import os\ndef main():\n    print('bye', flush=True)\n    os._exit(3)\n")
    assert body["status"] == "runtime_error", body
    assert body["runtime_error_type"] == "nonzero_exit"
    assert body["exit_code"] == 3
    assert body["stdout"] == "bye\n"


@pytest.mark.parametrize(
    ("language", "code"),
    [
        pytest.param("python", "import os, signal\ndef main():\n    os.kill(os.getpid(), signal.SIGKILL)\n",
                     id="python"),
        pytest.param("nodejs", "function main() {\n  process.kill(process.pid, 'SIGKILL');\n}\n", id="nodejs"),
    ],
)
def test_kill_by_signal_is_a_signalled_runtime_error(tight: Service, language: str, code: str) -> None:
    body = run(tight, code, language=language)
    assert body["status"] == "runtime_error", body
    assert body["runtime_error_type"] == "signalled"
    assert body["exit_code"] == -9


@pytest.mark.skipif(BACKEND != "namespaces", reason="the seccomp filter is the namespaces backend's")
def test_disallowed_syscall_is_unauthorized_access(tight: Service) -> None:
    code = (
        "import ctypes\n"
        "def main():\n"
        "    libc = ctypes.CDLL(None, use_errno=True)\n"
        "    return libc.syscall(101, 0, 0, 0, 0)  # ptrace(PTRACE_TRACEME)\n"
    )
    body = run(tight, code)
    assert body["status"] == "unauthorized_access", body
    assert body["unauthorized_access_type"] == "disallowed_syscall"
    assert body["exit_code"] == -31  # SIGSYS


# -- rate limit ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def limited(make_service: Any) -> Iterator[Service]:
    service = make_service("ratelimited", {"SANDBOX_RATE_LIMIT": "3/minute", "SANDBOX_EXECUTOR_MANAGER_POOL_SIZE": "1"})
    yield service
    service.cleanup()


def test_rate_limited_is_minus_429(limited: Service) -> None:
    """RAGFlow's answer on /run: HTTP 200 with the -429 verdict (its client raises on any other
    status); the native API says 429 with Retry-After."""
    with limited.client() as client:
        for i in range(3):
            response = client.post("/run", json=run_body("def main(i):\n    return i\n", arguments={"i": i}))
            assert response.status_code == 200
            assert response.json()["result"]["value"] == i
        response = client.post("/run", json=run_body("def main():\n    return 1\n"))
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["status"] == "program_runner_error"
        assert body["exit_code"] == -429
        assert body["detail"] == body["stderr"] == "Too many requests, please try again later"
        assert body["result"] is None and body["stdout"] == ""
        # the native API shares the budget; health checks are never limited
        native = client.post("/v1/execute", json={"code": "def main():\n    return 1\n"})
        assert native.status_code == 429
        assert native.json()["exit_code"] == -429
        assert 1 <= int(native.headers["retry-after"]) <= 60  # 3/minute: when the first of the three leaves the window
        assert client.get("/healthz").status_code == 200


# -- internal fault -----------------------------------------------------------------


@pytest.fixture(scope="module")
def broken(make_service: Any) -> Iterator[Service]:
    """A service whose Python runtime environment is broken (empty): its python pool never fills."""
    service = make_service(
        "broken", {"SANDBOX_EXECUTOR_MANAGER_POOL_SIZE": "1", "SANDBOX_POOL_WAIT": "1s"},
        runtimes=("nodejs",), empty_runtimes=("python",), require_healthy=False,
    )
    yield service
    service.cleanup()


def test_health_is_503_while_a_pool_cannot_fill(broken: Service) -> None:
    with broken.client() as client:
        response = client.get("/healthz")
    assert response.status_code == 503, response.text
    assert response.json()["status"] != "ok"


def test_internal_fault_is_minus_3(broken: Service) -> None:
    body = run(broken, "def main():\n    return 1\n")
    assert body["status"] == "program_runner_error", body
    assert body["exit_code"] == -3
    assert body["detail"] == "internal_error"


def test_other_language_still_runs_when_one_pool_is_broken(broken: Service) -> None:
    body = run(broken, "function main() {\n  return 'nodejs works';\n}\n", language="nodejs")
    assert body["result"]["value"] == "nodejs works"
