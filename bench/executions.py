#!/usr/bin/env python3
"""CPU and wall time of one execution, in-process (no HTTP), per backend and workload.

``Executor.execute()`` is called back to back ``--requests`` times on a pool of
``--pool-size``, through execbox's library; for each workload it reports

* ``wall p50``: the median time one ``execute()`` takes (what a request waits for below
  the HTTP layer: lease, run, artifacts, classify);
* ``CPU/exec``: the CPU of this process and of every process it started (fork server,
  inits, drivers, runsc, the sentry and its ptrace stubs), divided by the executions.
  Counted by cgroups, so that nothing is lost to re-parenting (gVisor's ptrace stubs end
  up children of the host's init): this process runs in a cpuacct cgroup of its own,
  which every process it starts inherits, and the backend's sandbox cgroups live under a
  parent of their own; CPU = the growth of both counters (v1 ``cpuacct.usage``, v2
  ``cpu.stat usage_usec``). Split into ``this process`` (its own threads, from
  ``/proc/self/stat``: the executor's host side, pool, supervise, cgroup files, the
  fork server's reader) and ``below`` (everything else);
* ``settled``: the same CPU including the replacements still being built when the last
  answer came (the phase waits until the pool is full again before the second reading).

Less sensitive to other load than latency: compare the CPU figures of two commits run on
the same machine. Example::

    .venv/bin/python bench/executions.py --backends namespaces,gvisor --requests 100
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
for _path in (str(BENCH_DIR), str(REPO)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from procstat import proc_stat_fields
from workloads import WORKLOADS

__all__ = ["measure_executions"]


async def _pool_full(executor: Any, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(s.ready >= s.size and not s.creating for s in executor.pool_stats()):
            return
        await asyncio.sleep(0.02)


def _perf_control(command: bytes) -> None:
    """Under ``perf record --control fifo:CTL,ACK -D -1`` with EXECBOX_PERF_CTL=CTL,ACK:
    record the measured phase only (not the start-up: fork server imports...)."""
    fifos = os.environ.get("EXECBOX_PERF_CTL")
    if fifos:
        ctl, ack = fifos.split(",")
        with open(ctl, "wb") as fh:
            fh.write(command + b"\n")
        with open(ack, "rb") as fh:
            fh.read(5)


_CGROUP_ROOT = Path("/sys/fs/cgroup")
_TICK_MS = 1000.0 / os.sysconf("SC_CLK_TCK")


def _cgroup_cpu_ms(name: str) -> float:
    """CPU of cgroup ``name`` (and everything below it, removed children included), ms."""
    v2 = _CGROUP_ROOT / name / "cpu.stat"
    if v2.exists():
        for line in v2.read_text().splitlines():
            if line.startswith("usage_usec "):
                return int(line.split()[1]) / 1000.0
    v1 = _CGROUP_ROOT / "cpuacct" / name / "cpuacct.usage"
    return int(v1.read_text()) / 1e6 if v1.exists() else 0.0


def kernel_threads_ms() -> float:
    """CPU of the kernel's own threads (kworkers: network namespace and cgroup teardown,
    RCU...), which no cgroup of ours counts; machine-wide, so others' work shows too."""
    total_ns = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = proc_stat_fields(int(entry))
        if fields is None or fields[1] != "2":  # children of kthreadd
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            total_ns += int(Path(f"/proc/{entry}/schedstat").read_text().split()[0])
    return total_ns / 1e6


class CpuMeter:
    """This process's cgroup and the sandbox cgroups' parent: (total ms, this process ms)."""

    def __init__(self, own: str, sandboxes: str) -> None:
        self._own, self._sandboxes = own, sandboxes

    def read(self) -> tuple[float, float, float]:
        fields = proc_stat_fields(os.getpid()) or []
        own_ms = (int(fields[11]) + int(fields[12])) * _TICK_MS if fields else 0.0
        return _cgroup_cpu_ms(self._own) + _cgroup_cpu_ms(self._sandboxes), own_ms, kernel_threads_ms()

    def since(self, before: tuple[float, float, float]) -> tuple[float, float, float]:
        after = self.read()
        return after[0] - before[0], after[1] - before[1], after[2] - before[2]


def _v2() -> bool:
    controllers = _CGROUP_ROOT / "cgroup.controllers"
    return controllers.exists() and "cpu" in controllers.read_text().split()


def set_cpu_weight(name: str, shares: int) -> None:
    """Give cgroup ``name`` (v1 cpu.shares, default 1024; v2 cpu.weight, default 100) a
    larger share of a CPU that other processes compete for."""
    if _v2():
        (_CGROUP_ROOT / name / "cpu.weight").write_text(str(max(1, min(10000, shares * 100 // 1024))))
    else:
        (_CGROUP_ROOT / "cpu" / name / "cpu.shares").write_text(str(shares))


@contextlib.contextmanager
def own_cgroup(name: str, shares: int | None) -> Iterator[None]:
    """Run this process (and what it starts from now on) in cgroup ``name`` (v1: in the
    cpuacct hierarchy, and in cpu with ``shares``)."""
    bases = [_CGROUP_ROOT] if _v2() else [_CGROUP_ROOT / "cpuacct"] + ([_CGROUP_ROOT / "cpu"] if shares else [])
    own = Path("/proc/self/cgroup").read_text().splitlines()
    previous = {}
    for base in bases:
        key = base.name if base != _CGROUP_ROOT else ""
        previous[base] = next(
            line.split(":", 2)[2] for line in own
            if (line.startswith("0::") if not key else key in line.split(":")[1].split(","))
        )
        (base / name).mkdir()
        (base / name / "cgroup.procs").write_text(str(os.getpid()))
    if shares:
        set_cpu_weight(name, shares)
    try:
        yield
    finally:
        for base in bases:
            (base / previous[base].lstrip("/") / "cgroup.procs").write_text(str(os.getpid()))
            for _ in range(100):
                try:
                    (base / name).rmdir()
                    break
                except OSError:
                    time.sleep(0.1)


async def _phase(
    executor: Any, meter: CpuMeter, workload: Any, requests: int, warmup: int, gap_s: float = 0.0
) -> dict[str, Any]:
    from execbox.models import ExecutionRequest, Language, Status

    request = ExecutionRequest(code=workload.code, language=Language(workload.language), arguments=workload.arguments)
    for _ in range(warmup):
        await executor.execute(request)
    await _pool_full(executor, 60.0)
    _perf_control(b"enable")
    before = meter.read()
    walls: list[float] = []
    failed = 0
    started = time.perf_counter()
    for _ in range(requests):
        if gap_s:
            await asyncio.sleep(gap_s)
        t0 = time.perf_counter()
        result = await executor.execute(request)
        walls.append((time.perf_counter() - t0) * 1000.0)
        failed += result.status is not Status.SUCCESS
    elapsed = time.perf_counter() - started
    answered = meter.since(before)
    _perf_control(b"disable")
    await _pool_full(executor, 60.0)
    settled = meter.since(before)
    n = max(1, requests)
    return {
        "wall_p50_ms": round(statistics.median(walls), 2),
        "wall_p90_ms": round(sorted(walls)[int(0.9 * (len(walls) - 1))], 2),
        "failed": failed,
        "elapsed_s": round(elapsed, 2),
        "cpu_ms_per_exec": round(answered[0] / n, 2),
        "this_process_ms_per_exec": round(answered[1] / n, 2),
        "below_ms_per_exec": round((answered[0] - answered[1]) / n, 2),
        "settled_cpu_ms_per_exec": round(settled[0] / n, 2),
        "kernel_threads_ms_per_exec": round(settled[2] / n, 2),
    }


async def _backend(name: str, workloads: list[str], args: argparse.Namespace, state: Path) -> dict[str, Any]:
    from execbox.models import Language
    from execbox.service.backends import build_backend
    from execbox.service.executor import Executor
    from execbox.settings import Settings

    configured = Settings.load()
    (state / "runtimes").symlink_to(configured.runtime_dir.resolve())
    settings = Settings.load(
        state_dir=state, uid_base=configured.uid_base + configured.uid_count + 2048, uid_count=64,
        code_check="off", executor_manager_pool_size=args.pool_size,
    )  # fmt: skip
    if name == "namespaces":  # sandbox cgroups under a parent of this process's own
        from execbox.isolation.cgroups import CgroupManager
        from execbox.isolation.namespaces import NamespacesBackend

        backend: Any = NamespacesBackend(
            settings.state_dir, settings.uid_base, settings.uid_count,
            cgroups=CgroupManager(parent=f"execbox-bench-ns-{os.getpid()}"), forkserver=settings.forkserver,
        )  # fmt: skip
        sandboxes = backend._cgroups.parent
    else:
        backend = build_backend(name, settings)
        sandboxes = backend._cgroups.parent
    backend.check()
    meter = CpuMeter(f"execbox-bench-{os.getpid()}", sandboxes)
    languages = tuple(dict.fromkeys(Language(WORKLOADS[w].language) for w in workloads))
    results: dict[str, Any] = {}
    async with Executor(settings, backend=backend, languages=languages) as executor:
        await executor.wait_ready(120.0)
        await _pool_full(executor, 120.0)
        if args.cpu_shares:
            set_cpu_weight(sandboxes, args.cpu_shares)
        for workload in workloads:
            results[workload] = await _phase(
                executor, meter, WORKLOADS[workload], args.requests, args.warmup, args.gap_ms / 1000.0
            )
            print(f"{name:<12} {workload:<14} {results[workload]}", flush=True)
    for hierarchy in _CGROUP_ROOT.iterdir():  # the namespaces parent made above (gVisor removes its own)
        with contextlib.suppress(OSError):
            (hierarchy / sandboxes).rmdir()
    with contextlib.suppress(OSError):
        (_CGROUP_ROOT / sandboxes).rmdir()
    return results


def measure_executions(backends: list[str], workloads: list[str], args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with own_cgroup(f"execbox-bench-{os.getpid()}", args.cpu_shares):
        for name in backends:
            with tempfile.TemporaryDirectory(prefix=f"execbox-exec-{name}-") as tmp:
                os.chmod(tmp, 0o755)
                results[name] = asyncio.run(_backend(name, workloads, args, Path(tmp)))
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/executions.py", description=__doc__.splitlines()[0])
    p.add_argument("--backends", default="namespaces,gvisor")
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--requests", type=int, default=100)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--pool-size", type=int, default=2)
    p.add_argument("--cpu-shares", type=int, default=0,
                   help="cpu.shares of this process's cgroup and of the sandboxes' parent (0: default): "
                        "on a machine others use too, this run then competes less with them")
    p.add_argument("--gap-ms", type=float, default=0.0,
                   help="pause before each request (lets the previous one's replacement be built first)")
    args = p.parse_args(argv)
    backends = [b for b in args.backends.split(",") if b]
    workloads = [w for w in args.workloads.split(",") if w]
    measure_executions(backends, workloads, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
