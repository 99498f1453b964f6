"""A memory limit kept by watching, where the kernel's cgroups only count memory (gVisor's).

gVisor's cgroupfs (runsc 2024-07) accounts each cgroup's memory (``memory.usage_in_bytes``)
but neither enforces ``memory.limit_in_bytes`` nor offers an OOM notification, an OOM
counter or a peak (no ``memory.oom_control``, no ``memory.max_usage_in_bytes``). Where
that is so (:func:`cgroups_enforce_memory`), the namespaces backend runs a
:class:`MemoryWatch` beside each execution: it reads the sandbox cgroup's usage every
``WATCH_INTERVAL_S`` and, once the usage is above the execution's limit, kills the
sandbox, whose verdict is then the memory limit, as after a kernel OOM kill; the highest
usage it saw is the execution's peak. A program can exceed its limit by what it
allocates in one interval before it is killed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from execbox.isolation.cgroups import Cgroup, CgroupManager

__all__ = ["WATCH_INTERVAL_S", "MemoryWatch", "cgroups_enforce_memory"]

#: how often a watched execution's memory is read
WATCH_INTERVAL_S = 0.01


def cgroups_enforce_memory(manager: CgroupManager) -> bool:
    """Whether the kernel enforces sandbox cgroups' memory limits itself: cgroup v2, or a
    v1 memory controller with OOM control (gVisor's has none, and enforces nothing)."""
    return manager.version == 2 or (manager.root / "memory" / "memory.oom_control").exists()


class MemoryWatch:
    """Kills a sandbox (``kill``) once its cgroup uses more than ``limit_bytes``; ``stop``
    says whether it did and the highest usage it saw."""

    def __init__(self, cgroup: Cgroup, limit_bytes: int, kill: Callable[[], None]) -> None:
        self._cgroup = cgroup
        self._limit_bytes = limit_bytes
        self._kill = kill
        self._stopped = threading.Event()
        self.tripped = False
        self.peak_bytes = 0
        self._thread = threading.Thread(target=self._watch, name=f"execbox-memwatch-{cgroup.name}", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stopped.wait(WATCH_INTERVAL_S):
            usage = self._cgroup.memory_usage_bytes()
            if usage is None:
                continue
            self.peak_bytes = max(self.peak_bytes, usage)
            if usage > self._limit_bytes:
                self.tripped = True
                self._kill()
                return

    def stop(self) -> tuple[bool, int | None]:
        """Stop watching; (whether the limit was exceeded, the peak usage seen or None)."""
        self._stopped.set()
        if self._thread is not threading.current_thread():
            self._thread.join()
        return self.tripped, self.peak_bytes or None
