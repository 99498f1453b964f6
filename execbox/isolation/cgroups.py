"""Per-sandbox cgroups: memory, pids and CPU limits, OOM detection, peak usage, kill-all.

cgroup v2 is used where the kernel offers its controllers at ``/sys/fs/cgroup``;
otherwise the v1 hierarchies (``memory``, ``pids``, ``cpu``, ``cpuacct``).
Every sandbox cgroup lives under one ``execbox`` parent so that start-up can reap what
a crashed service left behind.

Reuse (v1): making and removing a cgroup in four hierarchies costs more than the rest of
its bookkeeping (the kernel also offlines each memory cgroup in the background), so
:meth:`CgroupManager.release` keeps an emptied cgroup as a *spare* for the next sandbox
with the same limits: it is renamed to a spare name (``cgs-<owner pid>-<random>``, so
that ``reap`` still finds it) and, when :meth:`CgroupManager.acquire` hands it out,
renamed after its new sandbox, its limits set again and its peak and CPU counters reset.
Only a cgroup that is empty (every process of its sandbox is gone), never hit an OOM
kill and has served fewer than ``_REUSE_MAX`` sandboxes is kept; anything else is
removed as before. A sandbox sees nothing of its cgroup (a cgroup namespace of its own,
no cgroupfs mounted), so nothing of one sandbox reaches the next through it. On v2 the
peak counter cannot be reset, so cgroups are not reused there.
"""

from __future__ import annotations

import abc
import contextlib
import errno
import os
import signal
import threading
import time
from pathlib import Path

from execbox.errors import BackendUnavailableError, SandboxError
from execbox.isolation.owners import is_orphan, sandbox_name

__all__ = ["Cgroup", "CgroupManager"]

_V1_CONTROLLERS = ("memory", "pids", "cpu", "cpuacct")
_CPU_PERIOD_US = 100_000
#: a cgroup serves at most this many sandboxes (the little kernel memory that stays charged
#: to it after each one, a few hundred KiB, never adds up)
_REUSE_MAX = 64
#: spare cgroups kept per set of limits
_SPARES_MAX = 8


# cgroup files are read and written with bare os.open/os.read/os.write: Path.read_text and
# write_text add an fstat, an isatty ioctl and a seek per file through the io stack, and
# the sandboxes' set-up, verdict and teardown touch a dozen of these files each


def _write(path: Path, value: str) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)
    except OSError as exc:
        raise SandboxError(f"cannot write {value!r} to {path}: {exc.strerror}") from exc


def _read(path: Path) -> str:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return ""
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks).decode()
    except OSError:
        return ""
    finally:
        os.close(fd)


def _field(text: str, key: str) -> int | None:
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == key and value.strip().isdigit():
            return int(value)
    return None


class Cgroup(abc.ABC):
    """One sandbox's cgroup (in every hierarchy it needs)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._oom_fds: list[int] = []
        #: how many sandboxes this cgroup has served, and the limits it was made with
        #: (memory bytes, pids, cpus): both set by CgroupManager for reuse
        self.uses = 1
        self.limits: tuple[int, int, float] | None = None

    def _renamed(self, name: str) -> Cgroup:
        """This cgroup's directories renamed to ``name`` (same parent), as a new object that
        takes over the OOM notifier; this one is left pointing at the old, gone, names (so a
        destroyed sandbox's object never reaches the next sandbox's cgroup). SandboxError
        if the directories cannot be renamed."""
        raise SandboxError(f"cgroup {self.name} cannot be renamed")

    def _hand_over(self, other: Cgroup) -> Cgroup:
        other._oom_fds, self._oom_fds = self._oom_fds, []
        other.uses, other.limits = self.uses, self.limits
        return other

    def _reset(self, memory_bytes: int) -> bool:
        """Make a spare cgroup like a new one for its next sandbox: the memory limit, peak
        and CPU counters; False where that is impossible (it is not reused then)."""
        return False

    @abc.abstractmethod
    def attach(self, pid: int) -> None: ...

    def oom_notifier(self) -> int | None:
        """An eventfd that becomes readable when the cgroup hits its memory limit (the
        kernel's OOM notification), made once; None where the kernel offers none."""
        return None

    @abc.abstractmethod
    def set_memory_limit(self, memory_bytes: int) -> None: ...

    @abc.abstractmethod
    def oom_kills(self) -> int: ...

    @abc.abstractmethod
    def memory_peak_bytes(self) -> int | None: ...

    @abc.abstractmethod
    def memory_usage_bytes(self) -> int | None: ...

    def reset_memory_peak(self) -> None:
        """Start the peak afresh (a sandbox reused by several executions); no-op where unsupported."""

    @abc.abstractmethod
    def cpu_time_ms(self) -> float | None: ...

    @abc.abstractmethod
    def pids(self) -> list[int]: ...

    @abc.abstractmethod
    def _dirs(self) -> list[Path]: ...

    def threads(self) -> list[int]:
        """Every thread (task id) in the cgroup."""
        found: set[int] = set()
        for path in self._dirs():
            name = "cgroup.threads" if (path / "cgroup.threads").exists() else "tasks"
            found.update(int(t) for t in _read(path / name).split())
        return sorted(found)

    def procs_files(self) -> list[str]:
        """The ``cgroup.procs`` files a process writes itself into to join this cgroup."""
        return [str(path / "cgroup.procs") for path in self._dirs()]

    def kill_all(self, timeout_s: float = 5.0) -> None:
        """SIGKILL every process in the cgroup until it is empty."""
        deadline = time.monotonic() + timeout_s
        while pids := self.pids():
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if time.monotonic() > deadline:
                raise SandboxError(f"cgroup {self.name} still holds processes {pids} after SIGKILL")
            time.sleep(0.002)

    def remove(self) -> None:
        """Kill what is left and remove the cgroup directories; idempotent."""
        self.kill_all()
        while self._oom_fds:
            with contextlib.suppress(OSError):
                os.close(self._oom_fds.pop())
        for path in self._dirs():
            for _ in range(200):
                try:
                    path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY:
                        raise SandboxError(f"cannot remove cgroup {path}: {exc.strerror}") from exc
                    time.sleep(0.005)


class _CgroupV1(Cgroup):
    def __init__(self, name: str, dirs: dict[str, Path]) -> None:
        super().__init__(name)
        self._by_controller = dirs

    def _dirs(self) -> list[Path]:
        return list(dict.fromkeys(self._by_controller.values()))

    def threads(self) -> list[int]:
        # every hierarchy holds the same tasks: one is enough
        path = self._by_controller.get("cpu") or self._dirs()[0]
        name = "cgroup.threads" if (path / "cgroup.threads").exists() else "tasks"
        return sorted(int(t) for t in _read(path / name).split())

    def _renamed(self, name: str) -> Cgroup:
        renamed: dict[Path, Path] = {}
        try:
            for path in self._dirs():
                renamed[path] = path.with_name(name)
                os.rename(path, renamed[path])
        except OSError as exc:
            for old, new in renamed.items():  # put back what was renamed: one name in every hierarchy
                with contextlib.suppress(OSError):
                    os.rename(new, old)
            raise SandboxError(f"cannot rename cgroup {self.name} to {name}: {exc.strerror}") from exc
        return self._hand_over(_CgroupV1(name, {c: p.with_name(name) for c, p in self._by_controller.items()}))

    def _reset(self, memory_bytes: int) -> bool:
        mem = self._by_controller["memory"]
        self.set_memory_limit(memory_bytes)
        _write(mem / "memory.max_usage_in_bytes", "0")
        if (mem / "memory.memsw.max_usage_in_bytes").exists():
            _write(mem / "memory.memsw.max_usage_in_bytes", "0")
        if "cpuacct" in self._by_controller:
            _write(self._by_controller["cpuacct"] / "cpuacct.usage", "0")
        return True

    def attach(self, pid: int) -> None:
        for path in self._dirs():
            _write(path / "cgroup.procs", str(pid))

    def set_memory_limit(self, memory_bytes: int) -> None:
        mem = self._by_controller["memory"]
        files = [mem / "memory.limit_in_bytes"]
        if (mem / "memory.memsw.limit_in_bytes").exists():
            files.append(mem / "memory.memsw.limit_in_bytes")  # never below memory.limit_in_bytes
            if memory_bytes > int(_read(files[0]).strip() or 0):
                files.reverse()
        for path in files:
            _write(path, str(memory_bytes))

    def oom_kills(self) -> int:
        return _field(_read(self._by_controller["memory"] / "memory.oom_control"), "oom_kill") or 0

    def oom_notifier(self) -> int | None:
        if self._oom_fds:
            return self._oom_fds[0]
        mem = self._by_controller["memory"]
        try:
            event = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self._oom_fds.append(event)
            control = os.open(mem / "memory.oom_control", os.O_RDONLY | os.O_CLOEXEC)
            self._oom_fds.append(control)
            _write(mem / "cgroup.event_control", f"{event} {control}")
        except (OSError, SandboxError):
            return None
        return event

    def memory_peak_bytes(self) -> int | None:
        text = _read(self._by_controller["memory"] / "memory.max_usage_in_bytes").strip()
        return int(text) if text.isdigit() else None

    def memory_usage_bytes(self) -> int | None:
        text = _read(self._by_controller["memory"] / "memory.usage_in_bytes").strip()
        return int(text) if text.isdigit() else None

    def reset_memory_peak(self) -> None:
        with contextlib.suppress(SandboxError):
            _write(self._by_controller["memory"] / "memory.max_usage_in_bytes", "0")

    def cpu_time_ms(self) -> float | None:
        path = self._by_controller.get("cpuacct")
        text = _read(path / "cpuacct.usage").strip() if path else ""
        return int(text) / 1e6 if text.isdigit() else None

    def pids(self) -> list[int]:
        found: set[int] = set()
        for path in self._dirs():
            found.update(int(p) for p in _read(path / "cgroup.procs").split())
        return sorted(found)


class _CgroupV2(Cgroup):
    def __init__(self, name: str, path: Path) -> None:
        super().__init__(name)
        self.path = path

    def _dirs(self) -> list[Path]:
        return [self.path]

    def attach(self, pid: int) -> None:
        _write(self.path / "cgroup.procs", str(pid))

    def set_memory_limit(self, memory_bytes: int) -> None:
        _write(self.path / "memory.max", str(memory_bytes))
        if (self.path / "memory.swap.max").exists():
            _write(self.path / "memory.swap.max", "0")

    def oom_kills(self) -> int:
        return _field(_read(self.path / "memory.events"), "oom_kill") or 0

    def memory_peak_bytes(self) -> int | None:
        text = _read(self.path / "memory.peak").strip()
        return int(text) if text.isdigit() else None

    def memory_usage_bytes(self) -> int | None:
        text = _read(self.path / "memory.current").strip()
        return int(text) if text.isdigit() else None

    def cpu_time_ms(self) -> float | None:
        usage = _field(_read(self.path / "cpu.stat"), "usage_usec")
        return usage / 1000 if usage is not None else None

    def pids(self) -> list[int]:
        return [int(p) for p in _read(self.path / "cgroup.procs").split()]

    def kill_all(self, timeout_s: float = 5.0) -> None:
        if (self.path / "cgroup.kill").exists() and self.pids():
            _write(self.path / "cgroup.kill", "1")
        super().kill_all(timeout_s)


class CgroupManager:
    """Creates sandbox cgroups under one ``execbox`` parent, v2 where offered, else v1."""

    def __init__(self, root: Path = Path("/sys/fs/cgroup"), parent: str = "execbox") -> None:
        self.root = root
        self.parent = parent
        controllers = _read(root / "cgroup.controllers").split()
        self.version = 2 if {"memory", "pids", "cpu"} <= set(controllers) else 1
        self._spares: dict[tuple[int, int, float], list[Cgroup]] = {}
        self._lock = threading.Lock()

    def check(self) -> None:
        """Raise BackendUnavailableError unless sandbox cgroups can be created here."""
        if os.geteuid() != 0:
            raise BackendUnavailableError("cgroups need root: run the service as root")
        if self.version == 1:
            missing = [c for c in ("memory", "pids", "cpu") if not (self.root / c / "cgroup.procs").exists()]
            if missing:
                raise BackendUnavailableError(
                    f"cgroup controllers {missing} are not mounted under {self.root}; "
                    "mount cgroup v2 or the v1 memory, pids and cpu hierarchies"
                )
        probe = self.create(f"probe-{os.getpid()}-check", 64 << 20, 16, 1.0)
        probe.remove()

    def _v1_dirs(self, name: str) -> dict[str, Path]:
        dirs = {}
        for controller in _V1_CONTROLLERS:
            base = self.root / controller
            if (base / "cgroup.procs").exists():
                dirs[controller] = base.resolve() / self.parent / name
        return dirs

    def create(self, name: str, memory_bytes: int, pids_max: int, cpus: float) -> Cgroup:
        quota_us = max(1000, int(cpus * _CPU_PERIOD_US))
        if self.version == 2:
            parent = self.root / self.parent
            parent.mkdir(exist_ok=True)
            _write(self.root / "cgroup.subtree_control", "+memory +pids +cpu")
            _write(parent / "cgroup.subtree_control", "+memory +pids +cpu")
            path = parent / name
            path.mkdir()
            group: Cgroup = _CgroupV2(name, path)
            _write(path / "pids.max", str(pids_max))
            _write(path / "cpu.max", f"{quota_us} {_CPU_PERIOD_US}")
        else:
            dirs = self._v1_dirs(name)
            for path in dict.fromkeys(dirs.values()):
                path.mkdir(parents=True)
            group = _CgroupV1(name, dirs)
            _write(dirs["pids"] / "pids.max", str(pids_max))
            if "cpu" in dirs:
                _write(dirs["cpu"] / "cpu.cfs_period_us", str(_CPU_PERIOD_US))
                _write(dirs["cpu"] / "cpu.cfs_quota_us", str(quota_us))
        try:
            group.set_memory_limit(memory_bytes)
        except SandboxError:
            group.remove()
            raise
        group.limits = (memory_bytes, pids_max, cpus)
        return group

    def acquire(self, name: str, memory_bytes: int, pids_max: int, cpus: float) -> Cgroup:
        """A cgroup named ``name`` with these limits: a spare one (see the module docstring),
        renamed and reset, or else a new one. Give it back with :meth:`release`."""
        key = (memory_bytes, pids_max, cpus)
        while True:
            with self._lock:
                spares = self._spares.get(key)
                group = spares.pop() if spares else None
            if group is None:
                return self.create(name, memory_bytes, pids_max, cpus)
            if group.pids():  # nothing may have joined a spare; if something did, it is not reused
                group.remove()
                continue
            try:
                group = group._renamed(name)
                if group._reset(memory_bytes):
                    group.uses += 1
                    return group
            except SandboxError:
                pass
            with contextlib.suppress(SandboxError):
                group.remove()

    def release(self, group: Cgroup) -> None:
        """After its sandbox: empty ``group`` (SIGKILL what is left), then keep it as a spare
        when it can serve another sandbox, else remove it; idempotent like ``remove``."""
        group.kill_all()
        key = group.limits
        spare = (
            key is not None
            and self.version == 1
            and group.uses < _REUSE_MAX
            and group.oom_kills() == 0
            and not group.pids()
        )
        if spare:
            with self._lock:
                spare = len(self._spares.get(key, ())) < _SPARES_MAX
        if spare:
            try:
                renamed = group._renamed(sandbox_name("cgs"))
            except SandboxError:
                spare = False
        if not spare:
            group.remove()
            return
        with self._lock:
            self._spares.setdefault(key, []).append(renamed)

    def close(self) -> None:
        """Remove every spare cgroup (the manager may be used again afterwards)."""
        with self._lock:
            spares = [g for groups in self._spares.values() for g in groups]
            self._spares.clear()
        for group in spares:
            group.remove()

    def reap(self) -> int:
        """Kill and remove the sandbox cgroups whose owner is dead (left by a crash).

        Cgroup names are ``<kind>-<owner pid>-<id>``; those of a live owner (another
        execbox process on this host) are left alone.
        """
        reaped = 0
        parents = [self.root / self.parent] if self.version == 2 else [
            p.parent for p in self._v1_dirs("x").values()
        ]
        names: set[str] = set()
        for parent in parents:
            if parent.is_dir():
                names.update(p.name for p in parent.iterdir() if p.is_dir())
        for name in sorted(names):
            if not is_orphan(name):
                continue
            group: Cgroup = (
                _CgroupV2(name, self.root / self.parent / name)
                if self.version == 2
                else _CgroupV1(name, self._v1_dirs(name))
            )
            group.remove()
            reaped += 1
        return reaped
