"""Escape: after the suite, nothing of any sandbox is left on the host.

Runs last in the escape suite (file order). It starts an executor of its own, runs
programs that try hard to outlive their execution (daemons that ignore signals, detached
Node children, a timed-out program with children), closes it, and then checks every
sandbox this session created (all modules, all executors, already closed):

* no process in a sandbox's cgroup, no live process of a sandbox uid attributable to us,
  no child process of this test process (bwrap, zygote, runsc...) and no zombie of ours;
* no cgroup directory of a sandbox under ``/sys/fs/cgroup``;
* no mount and no file or directory in the state directory named after a sandbox.

Sandboxes are identified by the ids recorded by the ``executor`` fixtures (other
engineers' services on the same host are left alone).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from execbox.models import Status
from execbox.settings import Settings

if TYPE_CHECKING:
    from execbox.isolation.base import IsolationBackend
    from tests.conftest import CreatedSandboxes

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _proc_info(pid_dir: Path) -> tuple[str, int, int, str] | None:
    """(state, ppid, uid, cgroup text) of a process, None if it is gone."""
    try:
        status = (pid_dir / "status").read_text()
        cgroups = (pid_dir / "cgroup").read_text()
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return fields["State"].split()[0], int(fields["PPid"]), int(fields["Uid"].split()[0]), cgroups


def _subdirs(path: Path) -> list[Path]:
    """Sub-directories of a cgroup directory; other services' cgroups come and go meanwhile."""
    try:
        return [entry for entry in path.iterdir() if entry.is_dir()]
    except OSError:
        return []


def _cgroup_dirs(ids: list[str]) -> list[str]:
    """Cgroup directories named after a sandbox, under any ``execbox*`` parent, in any hierarchy."""
    found = []
    parents = [p for top in [CGROUP_ROOT, *_subdirs(CGROUP_ROOT)] for p in _subdirs(top) if p.name.startswith("execbox")]
    for parent in parents:
        stack = [(parent, 0)]
        while stack:
            path, depth = stack.pop()
            for child in _subdirs(path):
                if any(sid in child.name for sid in ids):
                    found.append(str(child))
                elif depth < 2:
                    stack.append((child, depth + 1))
    return found


#: what the backends start on the host (other children of the test process, e.g. the HTTP
#: services of tests/api, are not sandboxes and are left to their own fixtures)
MACHINERY_COMMS = ("bwrap", "prlimit", "runsc", "exe", "node", "python3", "python")
MACHINERY_CMDLINES = ("bwrap", "prlimit", "runsc", "zygote.py", "sandbox-init", "driver.py", "driver.js", "forkserver")


def _is_sandbox_machinery(pid_dir: Path, cmdline: str) -> bool:
    if any(word in cmdline for word in MACHINERY_CMDLINES):
        return True
    try:
        comm = (pid_dir / "comm").read_text().strip()
    except OSError:
        return False
    # a zombie has no cmdline left: judge it by its name
    return not cmdline.strip() and comm in MACHINERY_COMMS


def find_leftovers(ids: list[str], settings: Settings) -> list[str]:
    me = os.getpid()
    uid_range = range(settings.uid_base, settings.uid_base + settings.uid_count)
    leftovers = []
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit() or int(pid_dir.name) == me:
            continue
        info = _proc_info(pid_dir)
        if info is None:
            continue
        state, ppid, uid, cgroups = info
        try:
            cmdline = (pid_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:200]
        except OSError:
            cmdline = "?"
        where = f"pid {pid_dir.name} uid {uid} state {state} ppid {ppid}: {cmdline}"
        if ppid == me and _is_sandbox_machinery(pid_dir, cmdline):
            # bwrap, runsc, a fork server... or its zombie that nobody waited for
            leftovers.append(f"child process of the test process left: {where}")
        elif state != "Z" and any(sid in cgroups for sid in ids):
            kind = "sandbox uid" if uid in uid_range else "uid"
            leftovers.append(f"process ({kind}) in a sandbox cgroup left: {where}")
    leftovers += [f"cgroup left: {path}" for path in _cgroup_dirs(ids)]
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mount_point = line.split()[4]
        if any(sid in mount_point for sid in ids):
            leftovers.append(f"mount left: {mount_point}")
    state_dir = settings.state_dir
    if state_dir.is_dir():
        for root, dirs, files in os.walk(state_dir):
            depth = Path(root).relative_to(state_dir).parts
            if len(depth) >= 3 or "runtimes" in depth[:1]:
                dirs[:] = []
            for name in dirs + files:
                if any(sid in name for sid in ids):
                    leftovers.append(f"state left: {Path(root, name)}")
    return leftovers


def wait_for_no_leftovers(ids: list[str], settings: Settings, timeout_s: float = 15.0) -> list[str]:
    """The leftovers still there after a generous grace period (kills are asynchronous)."""
    deadline = time.monotonic() + timeout_s
    while (leftovers := find_leftovers(ids, settings)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return leftovers


STRAGGLERS = {
    "python daemon ignoring signals": (
        "python",
        """
        import os, signal, time

        def main():
            if os.fork() == 0:
                os.setsid()
                if os.fork():
                    os._exit(0)
                for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGUSR1):
                    signal.signal(sig, signal.SIG_IGN)
                time.sleep(3600)
                os._exit(0)
            return "daemon started"
        """,
        Status.SUCCESS,
    ),
    "python children of a timed-out program": (
        "python",
        """
        import os, time

        def main():
            for _ in range(5):
                if os.fork() == 0:
                    time.sleep(3600)
                    os._exit(0)
            print("waiting", flush=True)
            time.sleep(3600)
        """,
        Status.RESOURCE_LIMIT_EXCEEDED,
    ),
    "python killed by seccomp with a child alive": (
        "python",
        """
        import ctypes, os, time

        def main():
            if os.fork() == 0:
                time.sleep(3600)
                os._exit(0)
            ctypes.CDLL(None).unshare(0x10000000)
            return "not refused"
        """,
        None,
    ),
    "node detached child": (
        "nodejs",
        """
        const cp = require('child_process');
        function main() {
          const child = cp.spawn('/usr/bin/sleep', ['3600'], { detached: true, stdio: 'ignore' });
          child.unref();
          return child.pid > 0;
        }
        """,
        Status.SUCCESS,
    ),
}


def test_no_sandbox_leaves_anything_behind(
    sandbox_backend: IsolationBackend,
    sandbox_settings: Settings,
    start_executor: Any,
    created_sandboxes: CreatedSandboxes,
    backend_name: str,
) -> None:
    with start_executor(sandbox_backend) as runner:
        for name, (language, code, expected) in STRAGGLERS.items():
            result = runner.run(code, language, limits=runner.limits(wall_time_s=3.0))
            if expected is not None:
                assert result.status is expected, f"{name}: {runner.describe(result)}"
        runner.assert_still_works(("python", "nodejs"))
    # the executor is closed: every sandbox of the session must be gone without a trace
    ids = created_sandboxes.ids(backend_name)
    assert len(ids) >= 2 * len(STRAGGLERS), f"too few sandboxes recorded to check anything: {ids}"
    leftovers = wait_for_no_leftovers(ids, sandbox_settings)
    assert not leftovers, "\n".join(leftovers)


def test_the_leftover_probe_finds_a_planted_leftover(sandbox_settings: Settings) -> None:
    """The check above can fail: a fake sandbox (a cgroup with a process of a sandbox uid
    in it, a child of this process) is reported, and then cleaned up."""
    import subprocess
    import uuid

    import pytest

    from execbox.isolation.cgroups import CgroupManager

    if os.geteuid() != 0:
        pytest.skip("planting a cgroup needs root")
    fake_id = f"selftest-{os.getpid()}-{uuid.uuid4().hex[:12]}"  # owner pid = us: nobody reaps it
    cgroup = CgroupManager().create(fake_id, 64 << 20, 16, 1.0)
    uid = sandbox_settings.uid_base + sandbox_settings.uid_count - 2
    sleeper = subprocess.Popen(["sleep", "600"], user=uid, group=uid, extra_groups=[])
    fake_bwrap = subprocess.Popen(["bash", "-c", "exec -a bwrap-selftest sleep 600"])
    try:
        cgroup.attach(sleeper.pid)
        for _ in range(100):  # until bash has exec'd
            if b"bwrap-selftest" in Path(f"/proc/{fake_bwrap.pid}/cmdline").read_bytes():
                break
            time.sleep(0.05)
        leftovers = find_leftovers([fake_id], sandbox_settings)
        text = "\n".join(leftovers)
        assert f"(sandbox uid) in a sandbox cgroup left: pid {sleeper.pid} uid {uid}" in text
        assert f"child process of the test process left: pid {fake_bwrap.pid}" in text
        assert any(line.startswith("cgroup left:") and fake_id in line for line in leftovers), text
    finally:
        fake_bwrap.kill()
        fake_bwrap.wait(30)
        cgroup.remove()  # kills the sleeper
        sleeper.wait(30)
    assert wait_for_no_leftovers([fake_id], sandbox_settings) == []
