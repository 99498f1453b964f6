"""Shutdown (issue 3): SIGTERM with executions in flight.

What is asserted (the service's documented behaviour):

* in-flight requests are finished, not cut: each gets **200 with its own result**
  (uvicorn stops accepting connections, waits for running requests up to
  SANDBOX_TIMEOUT + 5 s, then the lifespan destroys every sandbox);
* new connections are refused while it drains;
* the service exits cleanly: status 0, or killed by the SIGTERM it was sent (uvicorn
  re-raises the signal once its graceful shutdown is complete);
* afterwards nothing is left: no process with one of the service's sandbox uids, none
  of the bwrap/prlimit/zygote processes it started, no cgroup named after its pid
  (``/sys/fs/cgroup/**/execbox/*-<pid>-*``), no mount of its state directory. (A
  sandbox's inner bwrap may linger a moment as a zombie, reparented to init, until init
  reaps it: zombies run nothing and hold no resources, so they are not counted.)
"""

from __future__ import annotations

import glob
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_helpers import Service, run_body

IN_FLIGHT = 3


def processes_with_uid(uids: range) -> list[tuple[int, str]]:
    """Live processes (zombies excluded: they hold nothing, and init reaps them) whose
    real uid is in ``uids``, as (pid, name)."""
    found = []
    for status in glob.glob("/proc/[0-9]*/status"):
        try:
            fields = dict(line.split(":", 1) for line in Path(status).read_text().splitlines() if ":" in line)
        except OSError:
            continue
        if int(fields["Uid"].split()[0]) in uids and not fields["State"].strip().startswith("Z"):
            found.append((int(status.split("/")[2]), fields["Name"].strip()))
    return found


def children_of(pid: int) -> list[int]:
    found = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = Path(stat).read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.split("/")[2]))
    return found


def command_of(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def cgroups_of(pid: int) -> list[str]:
    return glob.glob(f"/sys/fs/cgroup/*/execbox/*-{pid}-*") + glob.glob(f"/sys/fs/cgroup/execbox/*-{pid}-*")


@pytest.fixture
def service(make_service: Any) -> Iterator[Service]:
    service = make_service("shutdown", {"SANDBOX_EXECUTOR_MANAGER_POOL_SIZE": "2"})
    yield service
    service.cleanup()


def test_sigterm_finishes_in_flight_work_and_leaves_nothing(service: Service) -> None:
    pid = service.pid
    code = "import time\ndef main(i):\n    time.sleep(2)\n    return {'finished': i}\n"

    client = httpx.Client(base_url=service.url, timeout=60, limits=httpx.Limits(max_connections=IN_FLIGHT + 2))
    threads = ThreadPoolExecutor(IN_FLIGHT)
    try:
        futures = [
            threads.submit(client.post, "/run", json=run_body(code, arguments={"i": i})) for i in range(IN_FLIGHT)
        ]
        deadline = time.monotonic() + 10
        leased = 0
        while time.monotonic() < deadline and leased < IN_FLIGHT:
            pools = httpx.get(f"{service.url}/v1/info", timeout=5).json()["pools"]
            leased = sum(p["leased"] for p in pools)
            time.sleep(0.05)
        assert leased == IN_FLIGHT, f"only {leased} executions in flight"

        sandbox_children = [
            c for c in children_of(pid)
            if any(word in command_of(c) for word in ("bwrap", "prlimit", "zygote", "sandbox-init", "runsc"))
        ]
        assert sandbox_children, "the service has no sandbox processes to clean up"
        assert processes_with_uid(service.uid_range), "no process runs with the service's sandbox uids"
        assert cgroups_of(pid), "the service has no sandbox cgroups to clean up"

        os.kill(pid, signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(httpx.TransportError):
            httpx.post(f"{service.url}/run", json=run_body("def main():\n    return 1\n"), timeout=5)

        exit_status = service.process.wait(timeout=60)  # type: ignore[union-attr]
        answers = [future.result(timeout=60) for future in futures]
    finally:
        threads.shutdown(wait=True)
        client.close()

    assert exit_status in (0, -signal.SIGTERM), service.log_tail()
    assert "Application shutdown complete" in service.log()
    for i, response in enumerate(answers):
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["status"] == "success", body
        assert body["result"]["value"] == {"finished": i}

    time.sleep(0.2)
    assert processes_with_uid(service.uid_range) == []
    left = [c for c in sandbox_children if command_of(c)]
    assert left == [], [command_of(c) for c in left]
    assert cgroups_of(pid) == []
    mounts = Path("/proc/self/mountinfo").read_text()
    assert str(service.state_dir) not in mounts
    assert "destroying every sandbox" in service.log()
