"""MemoryWatch: the memory limit kept by watching where cgroups only count (gVisor's)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import cast

from execbox.isolation.cgroups import Cgroup, CgroupManager
from execbox.isolation.memwatch import MemoryWatch, cgroups_enforce_memory


class CountingCgroup:
    """A cgroup whose usage grows by ``step_bytes`` at each read."""

    name = "ns-1-test"

    def __init__(self, step_bytes: int) -> None:
        self.usage_bytes = 0
        self.step_bytes = step_bytes

    def memory_usage_bytes(self) -> int:
        self.usage_bytes += self.step_bytes
        return self.usage_bytes


def test_kills_once_above_the_limit_and_reports_the_peak() -> None:
    cgroup, killed = CountingCgroup(4 << 20), threading.Event()
    watch = MemoryWatch(cast(Cgroup, cgroup), 64 << 20, killed.set)
    assert killed.wait(30), "the watch never killed a sandbox above its limit"
    exceeded, peak = watch.stop()
    assert exceeded is True
    assert peak == cgroup.usage_bytes == 68 << 20  # the first reading above 64 MiB, then no more


def test_below_the_limit_nothing_is_killed() -> None:
    cgroup, killed = CountingCgroup(0), threading.Event()
    cgroup.usage_bytes = 10 << 20
    watch = MemoryWatch(cast(Cgroup, cgroup), 64 << 20, killed.set)
    assert not killed.wait(0.2)
    assert watch.stop() == (False, 10 << 20)


def _v1_root(tmp_path: Path, oom_control: bool) -> CgroupManager:
    for controller in ("memory", "pids", "cpu"):
        (tmp_path / controller).mkdir()
        (tmp_path / controller / "cgroup.procs").write_text("")
    if oom_control:
        (tmp_path / "memory" / "memory.oom_control").write_text("oom_kill_disable 0\n")
    return CgroupManager(root=tmp_path)


def test_only_a_memory_controller_without_oom_control_is_watched(tmp_path: Path) -> None:
    (tmp_path / "linux").mkdir()
    (tmp_path / "gvisor").mkdir()
    assert cgroups_enforce_memory(_v1_root(tmp_path / "linux", oom_control=True)) is True
    assert cgroups_enforce_memory(_v1_root(tmp_path / "gvisor", oom_control=False)) is False
