"""A service killed with SIGKILL takes its sandboxes down with it, on every backend.

With runs in flight and a live session, ``kill -9`` of the service leaves no process of
its sandboxes (its uid range), no process that names its state directory (bwrap, the fork
server, runsc and its sentry and gofer) and no child of its own: they die with it, by
parent-death signals, not by any later clean-up (the time they took is printed). What a hard kill can still leave on the host (cgroup directories, runsc state) is
reaped by the next start with the same state directory.
"""

from __future__ import annotations

import glob
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_helpers import Service, run_body
from test_api_shutdown import children_of, command_of, processes_with_uid

#: how long the test waits for the sandboxes to die with the service (parent-death signals
#: end them within a second on a quiet machine; the test prints how long it took)
WAIT_S = 10.0


def _backend_ready(backend: str) -> str | None:
    from execbox.errors import BackendUnavailableError
    from execbox.service.backends import build_backend
    from execbox.settings import Settings

    try:
        build_backend(backend, Settings.load()).check()
    except BackendUnavailableError as exc:
        return str(exc)
    return None


def _leftover_processes(service: Service) -> list[str]:
    found = [f"{pid} {name} (sandbox uid)" for pid, name in processes_with_uid(service.uid_range)]
    for status in glob.glob("/proc/[0-9]*/status"):
        pid = int(status.split("/")[2])
        command = command_of(pid)
        if str(service.state_dir) in command or str(service.root) in command:
            state = Path(status).read_text(errors="replace")
            if "\nState:\tZ" not in state:
                found.append(f"{pid} {command[:160]}")
    return found


def _cgroups(service: Service) -> list[str]:
    """The cgroup directories of this service's sandboxes (named after its state)."""
    marker = os.path.basename(service.root)
    return [p for p in glob.glob("/sys/fs/cgroup/**/execbox*/**", recursive=True) if marker in p]


@pytest.fixture(params=["namespaces", "gvisor"])
def killed_backend(request: pytest.FixtureRequest, backend_ready: None) -> Iterator[str]:
    reason = _backend_ready(request.param)
    if reason is not None:
        pytest.skip(f"{request.param} backend unavailable: {reason}")
    yield request.param


def test_sandboxes_die_within_a_second_of_a_hard_kill(make_service: Any, killed_backend: str) -> None:
    settings = {"SANDBOX_BACKEND": killed_backend, "SANDBOX_EXECUTOR_MANAGER_POOL_SIZE": "2", "SANDBOX_CODE_CHECK": "off"}
    service: Service = make_service(f"kill-{killed_backend}", settings)
    with service.client() as client:
        session = client.post("/v1/sessions", json={"language": "python"})
        assert session.status_code == 201, session.text
        cell = client.post(f"/v1/sessions/{session.json()['id']}/execute", json={"code": "x = 1"})
        assert cell.status_code == 200, cell.text

    def slow() -> None:
        code = "import time, subprocess\ndef main():\n    time.sleep(30)\n"
        try:
            httpx.post(f"{service.url}/run", json=run_body(code), timeout=40)
        except httpx.TransportError:
            pass  # the service is killed under it

    runners = [threading.Thread(target=slow, daemon=True) for _ in range(3)]
    for runner in runners:
        runner.start()
    time.sleep(1.5)  # the runs are in their sandboxes
    assert _leftover_processes(service), "the service runs sandboxes before the kill"
    children = children_of(service.pid)
    os.kill(service.pid, signal.SIGKILL)
    killed = time.monotonic()
    service.process.wait(10)

    def left() -> list[str]:
        return _leftover_processes(service) + [f"{pid} {command_of(pid)[:120]}" for pid in children if command_of(pid)]

    while left() and time.monotonic() - killed < WAIT_S:
        time.sleep(0.05)
    gone_s = time.monotonic() - killed
    assert not left(), f"{WAIT_S:g} s after kill -9: {left()}"
    # the figure (a second or less on a quiet machine) is printed, not asserted: timing
    # belongs to the benchmark; what is asserted is that nothing outlives the service
    print(f"\n{killed_backend}: every sandbox process was gone {gone_s:.2f} s after kill -9 of the service")
    for runner in runners:
        runner.join(10)
    # what a hard kill leaves (cgroups, runsc state) is reaped by the next start
    service.start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _stale(service):
        time.sleep(0.2)
    assert not _stale(service), _stale(service)
    with service.client() as client:
        answer = client.post("/run", json=run_body("def main():\n    return 42\n")).json()
        assert answer["status"] == "success" and answer["result"]["value"] == 42


def _stale(service: Service) -> list[str]:
    """Sandbox state of the killed process: runsc containers and workspaces under the state dir."""
    return [str(p) for p in service.state_dir.glob("**/runsc-root/*") if p.is_file() and "sandbox" in p.name]
