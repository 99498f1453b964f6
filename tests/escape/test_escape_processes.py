"""Escape: host processes and the service's environment stay out of reach.

/proc snooping, signalling host processes, ``kill(-1, SIGKILL)``, a fork bomb, and reading
the service's environment (a secret is planted in this test process's environment
before the executor starts any sandbox).
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from execbox.models import ResourceLimitType, Status

if TYPE_CHECKING:
    from tests.conftest import CreatedSandboxes, SandboxRunner

SECRET_NAME = "EXECBOX_TEST_SECRET"
SECRET_VALUE = f"do-not-leak-{uuid.uuid4().hex}"


@pytest.fixture(scope="module")
def sandbox_host_env() -> Iterator[None]:
    """Plant a secret in the service's (this process's) environment before sandboxes exist."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(SECRET_NAME, SECRET_VALUE)
        yield


def test_service_environment_is_not_visible(executor: SandboxRunner) -> None:
    assert os.environ[SECRET_NAME] == SECRET_VALUE  # the secret is there to be leaked
    result = executor.run(
        """
        import os

        def main():
            environs = {}
            for pid in os.listdir("/proc"):
                if pid.isdigit():
                    try:
                        with open(f"/proc/{pid}/environ", "rb") as fh:
                            environs[pid] = fh.read().decode("latin-1")
                    except OSError as exc:
                        environs[pid] = str(exc)
            return {"environ": dict(os.environ), "proc": environs}
        """
    )
    assert result.status is Status.SUCCESS, executor.describe(result)
    value = result.result.value  # type: ignore[union-attr]
    assert value["environ"], "the program saw no environment at all: the probe is broken"
    assert SECRET_NAME not in value["environ"]
    assert SECRET_VALUE not in repr(value)
    assert not any(key.startswith("SANDBOX_") for key in value["environ"])
    js = executor.run(
        "function main() { return { env: process.env, argv: process.argv, execArgv: process.execArgv }; }", "nodejs"
    )
    assert js.status is Status.SUCCESS, executor.describe(js)
    assert js.result is not None and js.result.value["env"]
    assert SECRET_NAME not in js.result.value["env"]
    assert SECRET_VALUE not in repr(js.result.value)
    executor.assert_still_works(("python", "nodejs"))


def test_host_processes_are_not_visible(executor: SandboxRunner) -> None:
    host_pid = os.getpid()
    result = executor.run(
        f"""
        import os

        def main():
            seen = {{}}
            for pid in os.listdir("/proc"):
                if pid.isdigit():
                    try:
                        with open(f"/proc/{{pid}}/cmdline", "rb") as fh:
                            seen[pid] = fh.read().replace(b"\\0", b" ").decode("latin-1")
                    except OSError as exc:
                        seen[pid] = "unreadable: " + str(exc)
            try:
                os.kill({host_pid}, 0)
                signalled = "delivered"
            except OSError as exc:
                signalled = type(exc).__name__
            return {{"pids": seen, "self": os.getpid(), "signal_host_test_process": signalled}}
        """
    )
    assert result.status is Status.SUCCESS, executor.describe(result)
    value = result.result.value  # type: ignore[union-attr]
    pids = {int(pid) for pid in value["pids"]}
    assert value["self"] in pids, f"the probe does not see itself: {value}"
    assert len(pids) <= 4, f"the sandbox sees more than its own processes: {value['pids']}"
    if host_pid > 16:  # a tiny host pid could coincide with a sandbox pid
        assert host_pid not in pids
    cmdlines = " ".join(value["pids"].values())
    # (the sandbox's own init may be bwrap, whose command line is the sandbox's own business)
    for host_only in ("pytest", "process_api", "systemd", "sshd", "runsc", "execbox serve", "uvicorn"):
        assert host_only not in cmdlines, f"host process {host_only!r} visible: {value['pids']}"
    assert value["signal_host_test_process"] == "ProcessLookupError"
    executor.assert_still_works()


def _sandbox_uids(created: CreatedSandboxes, backend_name: str) -> set[int]:
    """Host uids of the live processes of this session's sandboxes."""
    ids = created.ids(backend_name)
    uids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cgroups = (entry / "cgroup").read_text()
            status = (entry / "status").read_text()
        except OSError:
            continue
        if any(sid in cgroups for sid in ids):
            uids.add(int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1]))
    return uids


def test_kill_all_only_reaches_the_sandbox(
    executor: SandboxRunner, created_sandboxes: CreatedSandboxes, backend_name: str
) -> None:
    # host processes running as the very uids the live sandboxes use (and as nobody):
    # kill(-1, SIGKILL) from inside must not reach them
    settings = executor.settings
    executor.wait_ready()  # the warm sandboxes the next runs will use exist now
    uids = {u for u in _sandbox_uids(created_sandboxes, backend_name) if u != 0}
    if backend_name.startswith("namespaces"):
        # its sandboxed processes are host processes with host uids: the ready ones must be found
        assert uids, "no live process of this session's sandboxes found: the probe is broken"
    uids |= {settings.uid_base, 65534}
    sleepers = [
        subprocess.Popen(["sleep", "600"], user=uid, group=uid, extra_groups=[], start_new_session=True)
        for uid in sorted(uids)
    ]
    try:
        result = executor.run(
            """
            import os, signal

            def main():
                try:
                    os.kill(-1, signal.SIGKILL)
                except ProcessLookupError:
                    return "nothing to kill"
                return "sent"
            """
        )
        assert result.status is not Status.PROGRAM_RUNNER_ERROR, executor.describe(result)
        alive = [p.poll() is None for p in sleepers]
        assert all(alive), f"kill(-1) from the sandbox killed host processes of uids {sorted(uids)}: {alive}"
        js = executor.run("function main() { try { process.kill(-1, 'SIGKILL'); } catch (e) { return e.code; } }", "nodejs")
        assert js.status is not Status.PROGRAM_RUNNER_ERROR, executor.describe(js)
        assert all(p.poll() is None for p in sleepers)
    finally:
        for sleeper in sleepers:
            sleeper.kill()
            sleeper.wait()
    executor.assert_still_works(("python", "nodejs"))


def test_fork_bomb_is_contained(executor: SandboxRunner) -> None:
    result = executor.run(
        """
        import os, time

        def main():
            root = os.getpid()
            forks = failures = 0
            while True:
                try:
                    pid = os.fork()
                except OSError:
                    if os.getpid() == root:
                        failures += 1
                        if failures >= 20:
                            return {"forks": forks, "failures": failures}
                    time.sleep(0.01)
                    continue
                if pid and os.getpid() == root:
                    forks += 1
        """,
        limits=executor.limits(wall_time_s=8.0),
    )
    if result.status is Status.SUCCESS:
        # the process limit stopped it: fork() failed and the root process saw it
        assert result.result is not None and result.result.value["failures"] >= 20
        assert result.result.value["forks"] < executor.settings.max_pids
    else:
        # or a resource limit ended the whole sandbox (e.g. gVisor counts the bomb as memory)
        assert result.status is Status.RESOURCE_LIMIT_EXCEEDED, executor.describe(result)
        assert result.resource_limit_type in (ResourceLimitType.TIME, ResourceLimitType.MEMORY)
    # the host still forks and the next execution works
    assert subprocess.run(["true"], check=False, timeout=30).returncode == 0
    executor.assert_still_works(("python", "nodejs"))


def test_fork_bomb_with_threads_is_contained(executor: SandboxRunner) -> None:
    result = executor.run(
        """
        import threading, time

        def main():
            started = 0
            try:
                while True:
                    threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
                    started += 1
            except RuntimeError as exc:
                return {"threads": started, "error": str(exc)}
        """,
        limits=executor.limits(wall_time_s=8.0),
    )
    if result.status is Status.SUCCESS:
        # threads count against the process limit (SANDBOX_MAX_PIDS) like processes do
        assert result.result is not None
        assert result.result.value["threads"] < executor.settings.max_pids
    else:
        assert result.status is Status.RESOURCE_LIMIT_EXCEEDED, executor.describe(result)
    executor.assert_still_works()


def test_orphaned_children_do_not_survive_the_execution(executor: SandboxRunner) -> None:
    result = executor.run(
        """
        import os, signal, time

        def main():
            pid = os.fork()
            if pid == 0:
                os.setsid()
                if os.fork():
                    os._exit(0)
                for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
                    signal.signal(sig, signal.SIG_IGN)
                time.sleep(3600)
                os._exit(0)
            os.waitpid(pid, 0)
            return "left a daemon behind"
        """
    )
    assert result.status is Status.SUCCESS, executor.describe(result)
    executor.assert_still_works()
    # whether it is gone is checked by test_zz_leftovers at the end of the suite
