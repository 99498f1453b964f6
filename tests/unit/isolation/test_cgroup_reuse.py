"""CgroupManager reuse: a released sandbox cgroup serves the next sandbox with the same
limits, renamed and reset, and only when nothing of its previous sandbox is left.

Real cgroups: these tests need root and the v1 hierarchies (where cgroups are reused);
elsewhere they are skipped with the reason.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from execbox.isolation.cgroups import _REUSE_MAX, Cgroup, CgroupManager
from execbox.isolation.owners import sandbox_name

_ROOT = Path("/sys/fs/cgroup")
_MIB = 1 << 20


@pytest.fixture
def manager() -> Iterator[CgroupManager]:
    if os.geteuid() != 0:
        pytest.skip("real cgroups need root")
    manager = CgroupManager(parent=f"execbox-test-{os.getpid()}")
    if manager.version != 1:
        pytest.skip("cgroups are reused on the v1 hierarchies only (v2 cannot reset the peak counter)")
    yield manager
    manager.close()
    for hierarchy in _ROOT.iterdir():
        if (hierarchy / manager.parent).is_dir():
            (hierarchy / manager.parent).rmdir()


def _acquire(manager: CgroupManager, memory_mib: int = 64, name: str | None = None) -> Cgroup:
    """A cgroup for a sandbox with these limits (the same pids and CPU limits in every test)."""
    return manager.acquire(name or sandbox_name("ns"), memory_mib * _MIB, 32, 1.0)


def _exists(group_dirs: list[str]) -> list[str]:
    return [path for path in group_dirs if Path(path).exists()]


def _busy(group: Cgroup, seconds: float = 0.3) -> None:
    """Run a process that burns CPU and memory inside ``group``, then let it exit."""
    child = subprocess.Popen(
        [sys.executable, "-c", f"import time\nb = bytearray(8 << 20)\nt = time.time()\nwhile time.time() - t < {seconds}: pass"]
    )
    group.attach(child.pid)
    assert child.wait(30) == 0


def test_a_released_cgroup_serves_the_next_sandbox_renamed_and_reset(manager: CgroupManager) -> None:
    first_name, second_name = sandbox_name("ns"), sandbox_name("ns")
    first = _acquire(manager, name=first_name)
    first_dirs = first.procs_files()
    _busy(first)
    first.set_memory_limit(32 * _MIB)  # an execution asked for less
    assert (first.cpu_time_ms() or 0) > 0 and (first.memory_peak_bytes() or 0) >= 8 * _MIB
    manager.release(first)
    assert not _exists(first_dirs), "the released cgroup still carries its sandbox's name"

    second = _acquire(manager, name=second_name)
    assert second.uses == 2, "the spare cgroup was not reused"
    assert all(second_name in path for path in second.procs_files()) and _exists(second.procs_files())
    memory = next(Path(p).parent for p in second.procs_files() if "/memory/" in p)
    assert int((memory / "memory.limit_in_bytes").read_text()) == 64 * _MIB, "the spec's memory limit is back"
    assert (second.cpu_time_ms() or 0) < 1.0, "the CPU counter starts afresh"
    assert (second.memory_peak_bytes() or 0) < 8 * _MIB, "the peak starts afresh"
    assert second.pids() == [] and second.oom_kills() == 0
    # the first sandbox's object no longer reaches the cgroup its successor uses
    assert first.pids() == [] and not _exists(first.procs_files())
    manager.release(second)


def test_a_process_left_in_a_released_cgroup_is_killed_first(manager: CgroupManager) -> None:
    group = _acquire(manager)
    sleeper = subprocess.Popen(["/usr/bin/sleep", "60"])
    group.attach(sleeper.pid)
    manager.release(group)
    assert sleeper.wait(10) == -9, "the process left in the cgroup survived its release"
    again = _acquire(manager)
    assert again.uses == 2 and again.pids() == []
    manager.release(again)


def test_a_cgroup_that_saw_an_oom_kill_is_removed_not_reused(manager: CgroupManager) -> None:
    group = _acquire(manager, 16)
    dirs = group.procs_files()
    hog = subprocess.Popen([sys.executable, "-c", "import time\ntime.sleep(0.2)\nb = bytearray(256 << 20)"])
    group.attach(hog.pid)
    hog.wait(30)
    deadline = time.monotonic() + 5
    while group.oom_kills() == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert group.oom_kills() > 0, "the memory hog was not OOM-killed"
    manager.release(group)
    assert not _exists(dirs)
    fresh = _acquire(manager, 16)
    assert fresh.uses == 1, "a cgroup that OOM-killed was handed out again"
    manager.release(fresh)


def test_only_a_cgroup_of_the_same_limits_is_reused(manager: CgroupManager) -> None:
    group = _acquire(manager)
    manager.release(group)
    other = _acquire(manager, 128)
    assert other.uses == 1
    same = _acquire(manager)
    assert same.uses == 2
    manager.release(other)
    manager.release(same)


def test_a_cgroup_is_retired_after_its_last_reuse(manager: CgroupManager) -> None:
    group = _acquire(manager)
    for _ in range(_REUSE_MAX - 1):
        manager.release(group)
        group = _acquire(manager)
    assert group.uses == _REUSE_MAX
    manager.release(group)
    fresh = _acquire(manager)
    assert fresh.uses == 1, "a cgroup was reused more often than _REUSE_MAX"
    manager.release(fresh)


def test_closing_removes_the_spares_and_reap_finds_a_dead_owners_spares(manager: CgroupManager) -> None:
    group = _acquire(manager)
    manager.release(group)
    parent_dirs = [h / manager.parent for h in _ROOT.iterdir() if (h / manager.parent).is_dir()]
    spares = [d for parent in parent_dirs for d in parent.iterdir() if d.is_dir()]
    assert spares and all(d.name.startswith("cgs-") for d in spares), spares
    manager.close()
    assert not [d for d in spares if d.exists()], "closing the manager left its spare cgroups"
    # a spare left by a process that died is an orphan that reap() removes
    orphan = CgroupManager(parent=manager.parent).create(f"cgs-{2**22 + 12345}-deadbeef", 64 * _MIB, 32, 1.0)
    assert manager.reap() == 1
    assert not _exists(orphan.procs_files())
