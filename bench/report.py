"""Figures -> statistics, the printed tables, the machine description and the PNG chart."""

from __future__ import annotations

import datetime as dt
import math
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from workloads import TARGET_THROUGHPUT, TARGETS_MS

__all__ = ["chart", "latency_stats", "machine_info", "sandbox_table", "summary_table"]


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default ``linear`` method)."""
    if not sorted_values:
        return None
    if len(sorted_values) == 1:
        return sorted_values[0]
    position = (len(sorted_values) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def latency_stats(latencies_ms: list[float], ok: list[bool]) -> dict[str, Any]:
    """Percentiles over the *successful* requests (failures are counted, not timed)."""
    good = sorted(lat for lat, success in zip(latencies_ms, ok) if success)
    stats: dict[str, Any] = {"n_ok": len(good), "n_failed": len(latencies_ms) - len(good)}
    for q in (50, 90, 99):
        stats[f"p{q}_ms"] = percentile(good, q)
    stats["min_ms"] = good[0] if good else None
    stats["max_ms"] = good[-1] if good else None
    stats["mean_ms"] = sum(good) / len(good) if good else None
    stats["p99_over_p50"] = stats["p99_ms"] / stats["p50_ms"] if good and stats["p50_ms"] else None
    return stats


# -- machine -----------------------------------------------------------------------------------


def _first_line(path: str, prefix: str, sep: str = ":") -> str | None:
    """The value of the first line of ``path`` that starts with ``prefix`` (after ``sep``)."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(prefix) and sep in line:
                return line.split(sep, 1)[1].strip().strip('"')
    except OSError:
        pass
    return None


def _git(repo: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def machine_info(repo: Path) -> dict[str, Any]:
    mem_kb = _first_line("/proc/meminfo", "MemTotal")
    status = _git(repo, "status", "--porcelain", "--untracked-files=no")
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": _first_line("/proc/cpuinfo", "model name"),
        "memory_total_mib": int(mem_kb.split()[0]) // 1024 if mem_kb else None,
        "kernel": platform.release(),
        "os": _first_line("/etc/os-release", "PRETTY_NAME=", "=") or platform.platform(),
        "python": sys.version.split()[0],
        "cgroup": "v2" if Path("/sys/fs/cgroup/cgroup.controllers").exists() else "v1",
        "git_commit": _git(repo, "rev-parse", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
        "load_average_at_start": load,
    }


# -- tables ------------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _errors(outcomes: dict[str, int]) -> str:
    bad = {k: v for k, v in outcomes.items() if k != "success"}
    if not bad:
        return "0"
    short = {
        "status:program_runner_error:no_available_container": "busy",
        "status:program_runner_error:internal_error": "internal",
        "connect_error": "connect",
    }
    return " ".join(f"{v} {short.get(k, k)}" for k, v in sorted(bad.items(), key=lambda kv: -kv[1]))


#: background CPU use (cores busy while no request is sent) above which a phase is flagged
QUIET_CORES = 0.25


def summary_table(targets: list[dict[str, Any]]) -> str:
    header = (
        f"{'workload':<14} {'backend':<12} {'n':>4} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} "
        f"{'p99/p50':>7} {'thr/s':>7} {'load p50':>8} {'CPU/exec':>8}  errors (sequential | under load)"
    )
    lines = [header, "-" * len(header)]
    noisy: list[str] = []
    for target in targets:
        if target.get("skipped"):
            lines.append(f"{'*':<14} {target['label']:<12} skipped: {target['skipped']}")
            continue
        for name, figures in target["workloads"].items():
            seq = figures.get("sequential", {})
            thr = figures.get("throughput", {})
            s = seq.get("stats", {})
            t = thr.get("stats", {})
            background = [p.get("background_busy_cores") for p in (seq, thr)]
            flag = any(b is not None and b > QUIET_CORES for b in background)
            if flag:
                noisy.append(f"{name}/{target['label']} ({', '.join(str(b) for b in background)})")
            lines.append(
                f"{(name + ('*' if flag else '')):<14} {target['label']:<12} {s.get('n_ok', 0):>4} {_fmt(s.get('p50_ms')):>8} "
                f"{_fmt(s.get('p90_ms')):>8} {_fmt(s.get('p99_ms')):>8} {_fmt(s.get('p99_over_p50'), 2):>7} "
                f"{_fmt(thr.get('throughput_per_s')):>7} {_fmt(t.get('p50_ms')):>8} "
                f"{_fmt((thr.get('service_cpu') or {}).get('total_ms_per_success')):>8}  "
                f"{_errors(seq.get('outcomes', {}))} | {_errors(thr.get('outcomes', {}))}"
            )
    if noisy:
        lines.append(
            f"* the machine was not idle before these phases (CPUs busy with no request sent, sequential/"
            f"throughput): {'; '.join(noisy)}: other processes competed, so these figures are pessimistic"
        )
    return "\n".join(lines)


def sandbox_table(costs: dict[str, Any]) -> str:
    header = (
        f"{'backend':<12} {'runtime':<12} {'create ms':>9} {'CPU ms':>7} {'(host':>6} {'sandbox)':>8} "
        f"{'destroy ms':>10} {'idle PSS MiB':>12} {'dirty MiB':>9} {'cgroup MiB':>10}"
    )
    lines = [header, "-" * len(header)]
    mib = 2**20
    for backend, per_language in costs.items():
        if "skipped" in per_language:
            lines.append(f"{backend:<12} skipped: {per_language['skipped']}")
            continue
        for language, s in per_language.items():
            if "error" in s:
                lines.append(f"{backend:<12} {language:<12} failed: {s['error']}")
                continue
            cpu = s["cpu_breakdown_ms_median"]
            host = sum(v for k, v in cpu.items() if k != "sandbox_cgroup_ms" and v is not None)
            mem = s["idle_memory_median"]

            def m(key: str) -> str:
                value = mem.get(key)
                return "-" if value is None else f"{value / mib:.1f}"

            lines.append(
                f"{backend:<12} {language:<12} {_fmt(s['wall_ms_median']):>9} {_fmt(s['cpu_ms_median']):>7} "
                f"{_fmt(host):>6} {_fmt(cpu.get('sandbox_cgroup_ms')):>8} {_fmt(s['destroy_ms_median']):>10} "
                f"{m('pss_bytes'):>12} {m('private_dirty_bytes'):>9} {m('cgroup_current_bytes'):>10}"
            )
    return "\n".join(lines)


# -- chart -------------------------------------------------------------------------------------


def _draw_costs(ax_create: Any, ax_mem: Any, costs: dict[str, Any]) -> None:
    """Sandbox creation wall/CPU (log scale) and idle memory, per backend and runtime."""
    names = list(costs)
    xs = range(len(names))
    width = 0.38
    pairs = (("wall_ms_median", "wall", 0), ("cpu_ms_median", "CPU", 1))
    for key, label, index in pairs:
        values = [costs[n].get(key) or 0 for n in names]
        x = [i - width / 2 + index * width for i in xs]
        ax_create.bar(x, values, width * 0.95, label=label, color="tab:purple" if index == 0 else "tab:orange")
        for xi, value in zip(x, values):
            ax_create.annotate(f"{value:.0f}" if value >= 10 else f"{value:.1f}", (xi, value), ha="center",
                               va="bottom", fontsize=7, xytext=(0, 1), textcoords="offset points")
    ax_create.set_yscale("log")
    ax_create.set_xticks(list(xs), names, fontsize=8)
    ax_create.set_ylabel("ms per sandbox (log scale)")
    ax_create.set_title("Creating one fresh sandbox (in-process, median)")
    ax_create.grid(axis="y", which="both", alpha=0.3)
    ax_create.legend(fontsize=7, loc="upper left")

    mib = 2**20
    kinds = (("pss_bytes", "PSS"), ("private_dirty_bytes", "private dirty"), ("cgroup_current_bytes", "cgroup"))
    width = 0.8 / len(kinds)
    for index, (key, label) in enumerate(kinds):
        values = [(costs[n]["idle_memory_median"].get(key) or 0) / mib for n in names]
        x = [i - 0.4 + width * (index + 0.5) for i in xs]
        ax_mem.bar(x, values, width * 0.92, label=label)
        for xi, value in zip(x, values):
            ax_mem.annotate(f"{value:.0f}" if value >= 10 else f"{value:.1f}", (xi, value), ha="center",
                            va="bottom", fontsize=7, xytext=(0, 1), textcoords="offset points")
    ax_mem.set_xticks(list(xs), names, fontsize=8)
    ax_mem.set_ylabel("MiB")
    ax_mem.set_title("Memory of one idle warm sandbox (median)")
    ax_mem.grid(axis="y", alpha=0.3)
    ax_mem.legend(fontsize=7, loc="upper left")
    ax_mem.margins(y=0.12)


def chart(result: dict[str, Any], path: Path) -> str | None:
    """Latency percentiles (log scale) and throughput per workload and target; None if drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return f"matplotlib is not installed ({exc}); no chart"
    targets = [t for t in result["targets"] if not t.get("skipped")]
    if not targets:
        return "nothing to draw"
    workloads = list(dict.fromkeys(w for t in targets for w in t["workloads"]))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    costs = {
        f"{backend}\n{language}": figures
        for backend, per_language in (result.get("sandbox_cost") or {}).items()
        if "skipped" not in per_language
        for language, figures in per_language.items()
        if "error" not in figures
    }
    if costs:
        fig, axes = plt.subplots(
            2, 2, figsize=(13, 9.5), gridspec_kw={"width_ratios": [1.6, 1], "height_ratios": [1.2, 1]},
            constrained_layout=True,
        )
        (ax_lat, ax_thr), (ax_create, ax_mem) = axes
        _draw_costs(ax_create, ax_mem, costs)
    else:
        fig, (ax_lat, ax_thr) = plt.subplots(
            1, 2, figsize=(13, 5.2), gridspec_kw={"width_ratios": [1.6, 1]}, constrained_layout=True
        )
    group_width = 0.8
    per_target = group_width / len(targets)
    shades = {"p50": 1.0, "p90": 0.65, "p99": 0.35}
    for ti, target in enumerate(targets):
        colour = colours[ti % len(colours)]
        for wi, workload in enumerate(workloads):
            stats = target["workloads"].get(workload, {}).get("sequential", {}).get("stats", {})
            base = wi - group_width / 2 + ti * per_target
            width = per_target / 3
            for qi, q in enumerate(("p50", "p90", "p99")):
                value = stats.get(f"{q}_ms")
                if value is None:
                    continue
                x = base + qi * width + width / 2
                ax_lat.bar(
                    x, value, width * 0.92, color=colour, alpha=shades[q],
                    label=f"{target['label']} {q}" if wi == 0 else None,
                )
                ax_lat.annotate(
                    f"{value:.0f}" if value >= 10 else f"{value:.1f}", (x, value), ha="center", va="bottom",
                    fontsize=7, xytext=(0, 1), textcoords="offset points",
                )
            goal = TARGETS_MS.get(target["backend"], {}).get(workload)
            if goal is not None:
                ax_lat.hlines(goal, base, base + per_target, colors="black", linestyles="--", linewidth=1.2,
                              label="issue 5 target (p50)" if (wi == 0 and ti == 0) else None)
    ax_lat.set_yscale("log")
    drawn = [
        t["workloads"][w]["sequential"]["stats"].get("p50_ms")
        for t in targets for w in t["workloads"] if t["workloads"][w].get("sequential")
    ]
    drawn = [v for v in drawn if v]
    if drawn:  # bars on a log axis start at the bottom edge: put it at a power of ten below p50 / 2
        ax_lat.set_ylim(bottom=10 ** math.floor(math.log10(min(drawn) / 2)))
    ax_lat.set_xticks(range(len(workloads)), workloads)
    ax_lat.set_ylabel("latency per request, ms (log scale)")
    ax_lat.set_title("Sequential /run latency: p50, p90, p99 (successful requests)")
    ax_lat.grid(axis="y", which="both", alpha=0.3)
    ax_lat.legend(fontsize=7, ncols=max(1, len(targets)), loc="upper left")

    for ti, target in enumerate(targets):
        colour = colours[ti % len(colours)]
        for wi, workload in enumerate(workloads):
            thr = target["workloads"].get(workload, {}).get("throughput")
            if not thr:
                continue
            x = wi - group_width / 2 + ti * per_target + per_target / 2
            value = thr["throughput_per_s"]
            ax_thr.bar(x, value, per_target * 0.9, color=colour, label=target["label"] if wi == 0 else None)
            failed = thr.get("failures_in_window", 0)
            text = f"{value:.0f}" if value >= 10 else f"{value:.1f}"
            if failed:
                text += f"\n({failed} failed)"
            ax_thr.annotate(text, (x, value), ha="center", va="bottom", fontsize=7, xytext=(0, 1),
                            textcoords="offset points")
        goal = TARGET_THROUGHPUT.get(target["backend"])
        if goal is not None:
            ax_thr.axhline(goal, color=colour, linestyle="--", linewidth=1,
                           label=f"target {target['backend']} ({goal}/s)")
    concurrency = next(
        (w["throughput"]["concurrency"] for t in targets for w in t["workloads"].values() if w.get("throughput")), None
    )
    duration = next(
        (w["throughput"]["duration_s"] for t in targets for w in t["workloads"].values() if w.get("throughput")), None
    )
    ax_thr.set_xticks(range(len(workloads)), workloads)
    ax_thr.set_ylabel("successful executions per second")
    ax_thr.set_title(f"Throughput: {concurrency} concurrent clients, {duration:g} s" if concurrency else "Throughput")
    ax_thr.grid(axis="y", alpha=0.3)
    ax_thr.legend(fontsize=7, loc="upper right")
    ax_thr.margins(y=0.15)

    noisy = any(
        (phase.get("background_busy_cores") or 0) > QUIET_CORES
        for t in targets for w in t["workloads"].values() for phase in w.values() if isinstance(phase, dict)
    )
    m = result["machine"]
    fig.suptitle(
        f"execbox bench — {m.get('nproc')} CPUs ({m.get('cpu_model')}), {m.get('memory_total_mib')} MiB, "
        f"Linux {m.get('kernel')}, {m.get('date_utc')}, commit {(m.get('git_commit') or '?')[:10]}"
        + ("\nother processes kept the machine busy during some phases: those figures are pessimistic"
           if noisy else ""),
        fontsize=9, color="darkred" if noisy else "black",
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
