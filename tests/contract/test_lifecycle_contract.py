"""Sandbox lifecycle on every backend: a sandbox killed from outside mid-execution, and
nothing left behind after many executions beyond the warm pool."""

from __future__ import annotations

import glob
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from execbox.isolation.base import IsolationBackend, Sandbox
from execbox.models import RuntimeErrorType, Status


@pytest.fixture
def captured(sandbox_backend: IsolationBackend) -> Iterator[list[Sandbox]]:
    """Every sandbox the backend creates during the test (to act on it from the host)."""
    sandboxes: list[Sandbox] = []
    create = sandbox_backend.create

    def capture(spec: Any) -> Sandbox:
        sandbox = create(spec)
        sandboxes.append(sandbox)
        return sandbox

    sandbox_backend.create = capture  # type: ignore[method-assign]
    try:
        yield sandboxes
    finally:
        sandbox_backend.create = create  # type: ignore[method-assign]


def _cgroup_dirs(sandbox_id: str) -> list[str]:
    return glob.glob(f"/sys/fs/cgroup/*/execbox*/{sandbox_id}") + glob.glob(f"/sys/fs/cgroup/execbox*/{sandbox_id}")


def test_a_sandbox_killed_from_outside_gives_a_clean_verdict(
    sandbox_backend: IsolationBackend, captured: list[Sandbox], start_executor: Any
) -> None:
    with start_executor(sandbox_backend) as runner:
        outcome: dict[str, Any] = {}
        code = "import time\ndef main():\n    print('started', flush=True)\n    time.sleep(30)\n"
        worker = threading.Thread(target=lambda: outcome.setdefault("result", runner.run(code)))
        worker.start()
        deadline = time.monotonic() + 60
        leased: Sandbox | None = None
        while leased is None and time.monotonic() < deadline:
            leased = next((s for s in captured if s.spec.runtime.name == "python" and not s.alive()), None)
            time.sleep(0.05)
        assert leased is not None, "no sandbox was leased for the execution"
        time.sleep(1.0)  # the program is sleeping now
        cgroup = leased.cgroup  # type: ignore[attr-defined]
        victims = cgroup.pids()
        assert victims, "the running sandbox has no process in its cgroup"
        for pid in victims:  # an operator (or another program) kills the sandbox from outside
            os.kill(pid, signal.SIGKILL)
        worker.join(60)
        assert not worker.is_alive(), "the execution did not end after its sandbox was killed"
        result = outcome["result"]
        assert result.status is Status.RUNTIME_ERROR, runner.describe(result)
        assert result.runtime_error_type is RuntimeErrorType.SIGNALLED
        assert result.exit_code == -signal.SIGKILL
        runner.assert_still_works(("python", "nodejs"))


def _container(sandbox_id: str) -> str:
    """The host-side sandbox an execution ran in: itself, or its long-lived gVisor sandbox."""
    return sandbox_id.split(".", 1)[0]


def test_nothing_is_left_after_many_executions_beyond_the_warm_pool(
    sandbox_backend: IsolationBackend, captured: list[Sandbox], start_executor: Any
) -> None:
    # gVisor sandboxes cost more CPU to prepare: fewer executions still cycle every pool slot many times
    executions = 200 if sandbox_backend.name == "namespaces" else 80
    with start_executor(sandbox_backend) as runner:
        failures: list[str] = []

        def work(share: int, offset: int) -> None:
            for i in range(share):
                n = offset + i
                if n % 2:
                    result = runner.run("function main({n}) { return n * 2 }", "nodejs", {"n": n})
                else:
                    result = runner.run("def main(n):\n    return n * 2\n", arguments={"n": n})
                if result.status is not Status.SUCCESS or result.result is None or result.result.value != n * 2:
                    failures.append(runner.describe(result))

        threads = [threading.Thread(target=work, args=(executions // 4, k * executions // 4)) for k in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(600)
        assert not failures, failures[:3]
        assert len(captured) >= executions
        # once the pools have settled, only the warm sandboxes still exist (with two walls: the
        # long-lived gVisor sandboxes that hold them, named by the part of the id before the dot)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            stats = runner.executor.pool_stats()
            live = {c for c in {_container(s.id) for s in captured} if _cgroup_dirs(c)}
            if all(s.creating == 0 and s.leased == 0 for s in stats) and len(live) == sum(s.ready for s in stats):
                break
            time.sleep(0.2)
        stats = runner.executor.pool_stats()
        warm = sum(s.ready for s in stats)
        assert warm == len(stats), stats  # pool size 1 per language
        containers = {_container(s.id) for s in captured}
        live = {c for c in containers if _cgroup_dirs(c)}
        assert len(live) == warm, f"{len(live)} sandbox cgroups remain for {warm} warm sandboxes: {sorted(live)[:5]}"
        ids = containers
        lingering = []
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit():
                try:
                    cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
                except OSError:
                    continue
                lingering += [sid for sid in ids - live if sid in cmdline]
        assert not lingering, f"processes of destroyed sandboxes remain: {lingering[:5]}"
        if sandbox_backend.name == "gvisor":
            state = runner.settings.state_dir / "gvisor" / "state"
            listed = subprocess.run(
                ["/usr/bin/runsc", "--root", str(state), "--network=none", "list", "--quiet"],
                capture_output=True, text=True, timeout=60, check=False,
            ).stdout.split()
            ours = [c for c in listed if c in ids]
            assert sorted(ours) == sorted(live), f"runsc containers beyond the warm pool: {sorted(set(ours) - live)}"


def test_closing_the_executor_is_not_reported_as_a_crash(
    sandbox_backend: IsolationBackend, start_executor: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """An orderly shutdown ends every fork server (on the host and inside each gVisor
    sandbox) without a warning that one of them exited: such a warning means a crash."""
    with caplog.at_level(logging.WARNING, logger="execbox"):
        with start_executor(sandbox_backend) as runner:
            for code in ("def main():\n    return 1\n", "import numpy\ndef main():\n    return 1\n"):
                result = runner.run(code)
                assert result.status is Status.SUCCESS, runner.describe(result)
    exits = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "exited" in r.getMessage()]
    assert not exits, exits
