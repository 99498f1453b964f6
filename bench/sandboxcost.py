"""In-process sandbox figures (no HTTP): the cost to create one fresh sandbox, and the memory
of one idle warm sandbox, per backend and runtime, through execbox's library.

What "CPU" counts (all deltas across one ``backend.create(spec)``):

* ``bench_process_ms``: this process, every thread (``time.process_time``): the backend's
  host-side work: fork/exec of bwrap (or runsc), pipes, cgroup writes, waiting for ready.
* ``reaped_children_ms``: children that exited and were waited for during the create
  (``getrusage(RUSAGE_CHILDREN)``), e.g. short-lived helper commands.
* ``host_helpers_ms``: live descendants of this process that are *not* in the sandbox's
  cgroup (e.g. the bwrap monitor process, a runsc sandbox parent), every thread, from
  ``/proc/<pid>/task/*/schedstat`` (ns precision).
* ``sandbox_cgroup_ms``: the sandbox's cgroup CPU usage (``sandbox.cgroup.cpu_time_ms()``):
  everything that ran inside the sandbox after the host attached its init to the cgroup
  (mount setup, interpreter start, driver import, ``ready``). When the sandbox has no
  ``cgroup`` attribute, its processes are covered by ``host_helpers_ms`` when they are
  descendants of this process, and not at all otherwise (then ``complete`` is false).

``cpu_ms`` is their sum. Nothing is counted twice: cgroup members are excluded from the
descendants' sum.

Memory of an idle warm sandbox (after ``settle_s``, driver waiting for a request):

* ``cgroup_current_bytes``: ``memory.current`` (v2) / ``memory.usage_in_bytes`` (v1) of the
  sandbox's cgroup: anonymous memory, tmpfs, kernel memory, *and page cache first touched by
  this cgroup* (so it depends on what earlier sandboxes already had in cache).
  ``cgroup_anon_bytes`` / ``cgroup_file_bytes`` split it (memory.stat).
* ``pss_bytes`` / ``rss_bytes`` / ``uss_bytes``: the sum over the sandbox's processes
  (cgroup members, else the init pid and its descendants) of ``/proc/<pid>/smaps_rollup``
  Pss, Rss, Private_Clean + Private_Dirty. PSS shares shared pages among their users:
  a fair share of everything mapped. USS counts pages mapped by this sandbox alone, *file
  pages included* (a runtime binary that only one sandbox maps is all USS and PSS until a
  second sandbox maps it). ``anon_bytes`` (smaps Anonymous) counts anonymous pages still
  shared copy-on-write with a fork server in full.
  ``private_dirty_bytes`` (smaps Private_Dirty): pages this sandbox alone has written (its
  heap, stacks, copy-on-write copies): what destroying it gives back for sure, i.e. the
  memory one more warm sandbox costs once its runtime's files are in the page cache.
* ``host_helpers_pss_bytes``: PSS of host-side processes outside the cgroup started for this
  sandbox (the bwrap monitor); ``shared_helpers_pss_bytes``: those that serve every sandbox
  and were running before it (a fork server), not part of one sandbox's cost.

The first sandbox of each backend and runtime is created untimed (its figures are kept as
``first_create_*``): it pays one-time set-up such as starting a fork server.
"""

from __future__ import annotations

import contextlib
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from procstat import descendants

__all__ = ["measure_backends"]

_CGROUP_ROOT = Path("/sys/fs/cgroup")


# -- /proc helpers ---------------------------------------------------------------------------


def _process_cpu_ns(pid: int) -> int:
    """CPU time of every live thread of ``pid`` (schedstat's sum_exec_runtime, ns)."""
    total = 0
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
    return total


def _smaps_rollup(pid: int) -> dict[str, int]:
    """Rss, Pss, Uss, Anonymous, Private_Dirty of one process in bytes (empty if unreadable)."""
    values: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return values
    for line in text.splitlines()[1:]:
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            values[name.strip()] = int(parts[0]) * 1024
    return {
        "rss": values.get("Rss", 0),
        "pss": values.get("Pss", 0),
        "uss": values.get("Private_Clean", 0) + values.get("Private_Dirty", 0),
        "anon": values.get("Anonymous", 0),
        "dirty": values.get("Private_Dirty", 0),
    }


def _memory_cgroup_dir(pid: int) -> Path | None:
    """The memory cgroup directory of ``pid`` (v2 unified, or the v1 memory hierarchy)."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return None
    v2 = None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return _CGROUP_ROOT / "memory" / path.lstrip("/")
        if controllers == "":
            v2 = _CGROUP_ROOT / path.lstrip("/")
    if v2 is not None and (v2 / "memory.current").exists():
        return v2
    return None


def _cgroup_memory(directory: Path) -> dict[str, int | None]:
    def read_int(name: str) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            return int((directory / name).read_text().strip())
        return None

    stat: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in (directory / "memory.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if value.strip().isdigit():
                stat[key] = int(value)
    if (directory / "memory.current").exists():  # v2
        return {"current": read_int("memory.current"), "anon": stat.get("anon"), "file": stat.get("file")}
    return {
        "current": read_int("memory.usage_in_bytes"),
        "anon": stat.get("total_rss", stat.get("rss")),
        "file": stat.get("total_cache", stat.get("cache")),
    }


# -- one sandbox -----------------------------------------------------------------------------


def _cpu_counters() -> tuple[float, float]:
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time(), children.ru_utime + children.ru_stime


def _measure_one(backend: Any, spec: Any, settle_s: float) -> dict[str, Any]:
    me = os.getpid()
    before_desc = {key: _process_cpu_ns(pid) for key, pid in descendants(me).items()}
    proc_before, children_before = _cpu_counters()
    started = time.perf_counter()
    sandbox = backend.create(spec)
    wall_ms = (time.perf_counter() - started) * 1000.0
    proc_after, children_after = _cpu_counters()
    try:
        figures = _observe(sandbox, me, before_desc, proc_after - proc_before, children_after - children_before, settle_s)
    except BaseException:
        sandbox.destroy()
        raise
    destroy_started = time.perf_counter()
    sandbox.destroy()
    return {"wall_ms": wall_ms, **figures, "destroy_ms": (time.perf_counter() - destroy_started) * 1000.0}


def _observe(
    sandbox: Any, me: int, before_desc: dict[tuple[int, int], int], proc_s: float, children_s: float, settle_s: float
) -> dict[str, Any]:
    """CPU of the create just done, then (after ``settle_s``) the idle sandbox's memory."""
    after_desc = descendants(me)
    cgroup = getattr(sandbox, "cgroup", None)
    cgroup_pids: set[int] = set()
    cgroup_ms: float | None = None
    if cgroup is not None:
        with contextlib.suppress(Exception):
            cgroup_pids = set(cgroup.pids())
        with contextlib.suppress(Exception):
            cgroup_ms = cgroup.cpu_time_ms()
    helpers_ns = 0
    helper_pids: list[int] = []
    for key, pid in after_desc.items():
        if pid in cgroup_pids:
            continue
        helper_pids.append(pid)
        helpers_ns += max(0, _process_cpu_ns(pid) - before_desc.get(key, 0))
    cpu = {
        "bench_process_ms": proc_s * 1000.0,
        "reaped_children_ms": children_s * 1000.0,
        "host_helpers_ms": helpers_ns / 1e6,
        "sandbox_cgroup_ms": cgroup_ms,
    }
    cpu_ms = sum(v for v in cpu.values() if v is not None)

    time.sleep(settle_s)
    init_pid = getattr(sandbox, "init_pid", None)
    if cgroup_pids:
        with contextlib.suppress(Exception):
            cgroup_pids = set(cgroup.pids())
        members = sorted(cgroup_pids)
    elif init_pid:
        members = [init_pid, *sorted(descendants(init_pid).values())]
    else:
        members = sorted(after_desc.values())
    totals = {"rss": 0, "pss": 0, "uss": 0, "anon": 0, "dirty": 0}
    for pid in members:
        for key, value in _smaps_rollup(pid).items():
            totals[key] += value
    # host-side processes outside the sandbox: started by this create (per sandbox, e.g. the bwrap
    # monitor) or already running before it (shared by every sandbox, e.g. a fork server)
    own_helpers = [pid for key, pid in after_desc.items() if pid in helper_pids and key not in before_desc]
    shared_helpers = [pid for key, pid in after_desc.items() if pid in helper_pids and key in before_desc]
    memory: dict[str, Any] = {
        "processes": len(members),
        "pss_bytes": totals["pss"],
        "rss_bytes": totals["rss"],
        "uss_bytes": totals["uss"],
        "anon_bytes": totals["anon"],
        "private_dirty_bytes": totals["dirty"],
        "host_helpers_pss_bytes": sum(_smaps_rollup(pid).get("pss", 0) for pid in own_helpers),
        "shared_helpers_pss_bytes": sum(_smaps_rollup(pid).get("pss", 0) for pid in shared_helpers),
    }
    cg_dir = _memory_cgroup_dir(members[0]) if members else None
    if cg_dir is not None:
        cg_mem = _cgroup_memory(cg_dir)
        memory.update(
            cgroup_current_bytes=cg_mem["current"],
            cgroup_anon_bytes=cg_mem["anon"],
            cgroup_file_bytes=cg_mem["file"],
            cgroup_dir=str(cg_dir),
        )
    if cgroup is not None:
        with contextlib.suppress(Exception):
            memory["cgroup_peak_bytes"] = cgroup.memory_peak_bytes()
    return {
        "cpu_ms": cpu_ms,
        "cpu": cpu,
        # every sandbox process was counted (by its cgroup, or as a descendant of this process)
        "cpu_complete": cgroup is not None or set(members) <= set(after_desc.values()),
        "memory": memory,
    }


def _median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    walls = [r["wall_ms"] for r in runs]
    summary: dict[str, Any] = {
        "repeats": len(runs),
        "wall_ms_median": _median(walls),
        "wall_ms_min": min(walls),
        "wall_ms_max": max(walls),
        "cpu_ms_median": _median([r["cpu_ms"] for r in runs]),
        "cpu_breakdown_ms_median": {
            key: _median([r["cpu"][key] for r in runs if r["cpu"][key] is not None])
            for key in runs[0]["cpu"]
        },
        "destroy_ms_median": _median([r["destroy_ms"] for r in runs]),
    }
    memory_keys = [k for k, v in runs[0]["memory"].items() if isinstance(v, int)]
    summary["idle_memory_median"] = {k: _median([r["memory"].get(k) for r in runs]) for k in memory_keys}
    return summary


def _private_settings(settings_cls: Any, settings: Any, state_dir: Path) -> Any:
    """Settings for the bench's own backend: a private state dir and a uid range of its own,
    so that it never rewrites a running service's synthesized /etc nor shares its uids."""
    return settings_cls.load(
        state_dir=state_dir,
        uid_base=settings.uid_base + settings.uid_count,
        uid_count=16,
    )


def measure_backends(
    names: list[str], languages: list[str], *, repeats: int, settle_s: float, log: Any = print
) -> dict[str, Any]:
    """Per backend: {"skipped": reason} or {language: summary + raw runs}."""
    try:
        from execbox.runtimes import get_runtime
        from execbox.service.backends import build_backend
        from execbox.service.specs import sandbox_spec
        from execbox.settings import Settings
    except ImportError as exc:
        return {name: {"skipped": f"execbox is not importable here: {exc}"} for name in names}
    settings = Settings.load()
    # each language, and for Python also its light sandboxes (SANDBOX_PYTHON_LIGHT: forked from
    # a fork server without the preloads), where the backend forks them from a fork server
    entries = [(language, language, False) for language in languages]
    entries += [(f"{language}-light", language, True) for language in languages
                if get_runtime(language).preload and settings.python_light and settings.preload_modules]
    results: dict[str, Any] = {}
    for name in names:
        per_language: dict[str, Any] = {}
        for index, (key, language, light) in enumerate(entries):
            # a backend of its own per runtime, so that one runtime's helpers (a fork server)
            # are not counted as another's
            with tempfile.TemporaryDirectory(prefix=f"execbox-bench-{name}-") as state:
                os.chmod(state, 0o755)  # sandboxes (unprivileged uids) bind files from under it
                try:
                    backend = build_backend(name, _private_settings(Settings, settings, Path(state)))
                    if index == 0:
                        backend.check()
                except Exception as exc:  # BackendUnavailableError, ConfigurationError, ImportError...
                    reason = f"{type(exc).__name__}: {exc}"
                    log(f"[sandbox cost] skipping backend {name}: {reason}")
                    per_language = {"skipped": reason}
                    break
                spec = sandbox_spec(settings, get_runtime(language))
                if light and not backend.preloads(spec):
                    backend.close()
                    continue  # one kind of sandbox serves all code there
                if light:
                    spec = spec.without_preloads()
                try:
                    per_language[key] = _measure_language(backend, spec, repeats, settle_s)
                except Exception as exc:
                    reason = f"{type(exc).__name__}: {exc}"
                    log(f"[sandbox cost] {name}/{key} failed: {reason}")
                    per_language[key] = {"error": reason}
                    continue
                finally:
                    with contextlib.suppress(Exception):
                        backend.close()
            s = per_language[key]
            log(
                f"[sandbox cost] {name}/{key}: create {s['wall_ms_median']:.1f} ms wall, "
                f"{s['cpu_ms_median']:.1f} ms CPU (first {s['first_create_wall_ms']:.0f} ms); idle PSS "
                f"{(s['idle_memory_median'].get('pss_bytes') or 0) / 2**20:.1f} MiB, private dirty "
                f"{(s['idle_memory_median'].get('private_dirty_bytes') or 0) / 2**20:.1f} MiB"
            )
        results[name] = per_language
    return results


def _measure_language(backend: Any, spec: Any, repeats: int, settle_s: float) -> dict[str, Any]:
    # not in the medians: first touch of caches, and one-time set-up such as starting a fork server
    first = _measure_one(backend, spec, 0.0)
    runs = [_measure_one(backend, spec, settle_s) for _ in range(repeats)]
    return {
        **_summarise(runs),
        "first_create_wall_ms": first["wall_ms"],
        "first_create_cpu_ms": first["cpu_ms"],
        "runs": runs,
    }
