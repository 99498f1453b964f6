#!/usr/bin/env python3
"""execbox benchmark: latency, throughput, sandbox creation cost and idle memory.

Drives any service that speaks RAGFlow's ``POST /run`` contract (``--url``, repeatable),
or starts an execbox service of its own per backend (``--spawn-backends``), and measures
in-process, through execbox's library, what one fresh sandbox costs (``--backends``).
See bench/README.md for what every figure means. Example::

    .venv/bin/python bench/run.py --url http://127.0.0.1:9385
    .venv/bin/python bench/run.py --spawn-backends namespaces,gvisor
    .venv/bin/python bench/run.py --url http://127.0.0.1:9385 --quick
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
for _path in (str(BENCH_DIR), str(REPO)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from floors import measure_floors  # noqa: E402
from httpload import background_busy_cores, run_sequential, run_throughput, service_info, spawn_service, wait_pools_full  # noqa: E402
from procstat import TreeCpu, listening_pid  # noqa: E402
from report import QUIET_CORES, chart, latency_stats, machine_info, sandbox_table, summary_table  # noqa: E402
from sandboxcost import measure_backends  # noqa: E402
from workloads import WORKLOADS  # noqa: E402

DEFAULT_URL = "http://127.0.0.1:9385"


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip() and v.strip().lower() != "none"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/run.py",
        description="Benchmark a /run service: latency, throughput, sandbox creation cost, idle memory.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--url", action="append", default=[],
                   help=f"a running service speaking /run (repeatable; NAME=URL names it); default {DEFAULT_URL} "
                        "unless --spawn-backends is given")
    p.add_argument("--label", action="append", default=[],
                   help="name of the --url target of the same position (default: the backend /v1/info "
                        "reports, else 'unknown')")
    p.add_argument("--service-pid", default="auto",
                   help="pid of the --url service, to measure its CPU per request (it and every process "
                        "under it); 'auto': the process listening on the URL's port when it is on this host; "
                        "'none' to skip")
    p.add_argument("--spawn-backends", type=_csv, default=[],
                   help="start an execbox service per backend (comma-separated) on a free loopback port")
    p.add_argument("--backends", type=_csv, default=["namespaces", "gvisor"],
                   help="backends whose sandbox creation cost and idle memory are measured in-process "
                        "('none' to skip)")
    p.add_argument("--workloads", type=_csv, default=list(WORKLOADS),
                   help=f"comma-separated subset of {', '.join(WORKLOADS)}")
    p.add_argument("--requests", type=int, default=200, help="sequential requests per workload")
    p.add_argument("--warmup", type=int, default=10, help="unrecorded requests before the sequential ones")
    p.add_argument("--duration", type=float, default=20.0, help="seconds of the throughput phase per workload")
    p.add_argument("--concurrency", type=int, default=8, help="concurrent clients in the throughput phase")
    p.add_argument("--timeout", type=float, default=30.0, help="timeout of every HTTP request, seconds")
    p.add_argument("--phase-budget", type=float, default=300.0,
                   help="at most this many seconds for the sequential requests of one workload")
    p.add_argument("--repeats", type=int, default=10, help="sandboxes created per backend and runtime (in-process)")
    p.add_argument("--settle", type=float, default=0.5,
                   help="seconds a new sandbox idles before its memory is read")
    p.add_argument("--wait-quiet", type=float, default=0.0,
                   help="before each phase, wait up to this many seconds for the machine to be idle "
                        f"(under {QUIET_CORES} CPUs busy without our requests); a phase that starts on a busy "
                        "machine is flagged either way")
    p.add_argument("--spawn-shared-state", action="store_true",
                   help="let spawned services use the configured SANDBOX_STATE_DIR and uid range "
                        "(default: a private state dir and uid range, so a service already running is untouched)")
    p.add_argument("--out", type=Path, default=BENCH_DIR / "results", help="directory for the JSON, PNG and logs")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 20 requests, 2 warm-up, 3 s of load, 2 sandboxes per runtime")
    args = p.parse_args(argv)
    if args.quick:
        args.requests, args.warmup, args.duration, args.repeats, args.settle = 20, 2, 3.0, 2, 0.2
    unknown = [w for w in args.workloads if w not in WORKLOADS]
    if unknown:
        p.error(f"unknown workload(s) {unknown}; choose from {list(WORKLOADS)}")
    if not args.url and not args.spawn_backends:
        args.url = [DEFAULT_URL]
    if args.requests < 1 or args.concurrency < 1 or args.duration <= 0 or args.timeout <= 0:
        p.error("--requests, --concurrency, --duration and --timeout must be positive")
    return args


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _check_quiet(figures: dict[str, Any], phase: str, name: str, wait_s: float) -> None:
    """Measure (1 s) what the machine does while we send nothing; with --wait-quiet, wait up to
    ``wait_s`` for it to become idle; warn when it is not."""
    deadline = time.monotonic() + wait_s
    busy = background_busy_cores(1.0)
    if busy is not None and busy > QUIET_CORES and wait_s > 0:
        log(f"  waiting up to {wait_s:g} s for the machine to become idle ({busy:.2f} CPUs busy)")
        while busy is not None and busy > QUIET_CORES and time.monotonic() < deadline:
            busy = background_busy_cores(1.0)
    figures[f"_bg_{phase}"] = busy
    if busy is not None and busy > QUIET_CORES:
        log(f"  WARNING: before the {name} {phase} phase the machine kept {busy:.2f} CPUs busy without any "
            f"request from us: other processes compete, the figures below are pessimistic")


def _cpu_note(phase: dict[str, Any]) -> str:
    note = f"; machine busy {phase['machine_busy_cores']} of {os.cpu_count()} CPUs"
    cpu = phase.get("service_cpu") or {}
    if "total_ms_per_success" in cpu:
        note += (f"; service CPU {cpu['total_ms_per_success']:.1f} ms/success (service process "
                 f"{cpu['service_process_ms_per_success']:.1f}, below it {cpu['below_service_ms_per_success']:.1f})")
    return note


def _local_pid(url: str, given: str) -> int | None:
    """The pid of the service behind ``url`` when it runs on this host, per --service-pid."""
    if given == "none":
        return None
    if given != "auto":
        return int(given)
    parsed = urlsplit(url)
    if parsed.hostname not in ("127.0.0.1", "localhost", "::1", "0.0.0.0"):
        return None
    return listening_pid(parsed.port or (443 if parsed.scheme == "https" else 80))


def bench_target(url: str, label: str | None, args: argparse.Namespace, pid: int | None = None) -> dict[str, Any]:
    info = service_info(url)
    backend = info.get("backend", "unknown")
    target: dict[str, Any] = {"url": url, "label": label or backend, "backend": backend, "info": info,
                              "service_pid": pid, "workloads": {}}
    tree = TreeCpu(pid) if pid else None
    if info.get("healthz_status") is None and "error" in info:
        log(f"{url}: not reachable ({info['error']}); measuring anyway, every request will count as failed")
    log(f"target {url}: backend {backend}" + (f", service pid {pid}" if pid else ""))
    for name in args.workloads:
        workload = WORKLOADS[name]
        figures: dict[str, Any] = {}
        wait_pools_full(url, 30.0)
        _check_quiet(figures, "sequential", name, args.wait_quiet)
        log(f"  {name}: {args.warmup} warm-up + {args.requests} sequential requests")
        seq = run_sequential(url, workload, requests=args.requests, warmup=args.warmup,
                             timeout_s=args.timeout, budget_s=args.phase_budget, service_cpu=tree)
        seq["stats"] = latency_stats(seq["latencies_ms"], seq["ok"])
        figures["sequential"] = {**seq, "background_busy_cores": figures.pop("_bg_sequential")}
        s = seq["stats"]
        log(f"  {name}: p50 {s['p50_ms'] or 0:.1f} ms, p99 {s['p99_ms'] or 0:.1f} ms, "
            f"{s['n_failed']} failed{' (truncated by --phase-budget)' if seq['truncated_by_budget'] else ''}"
            f"{_cpu_note(seq)}")
        wait_pools_full(url, 30.0)
        _check_quiet(figures, "throughput", name, args.wait_quiet)
        log(f"  {name}: {args.concurrency} clients for {args.duration:g} s")
        thr = run_throughput(url, workload, concurrency=args.concurrency, duration_s=args.duration,
                             timeout_s=args.timeout, service_cpu=tree)
        thr["stats"] = latency_stats(thr["latencies_ms"], thr["ok"])
        figures["throughput"] = {**thr, "background_busy_cores": figures.pop("_bg_throughput")}
        log(f"  {name}: {thr['throughput_per_s']:.1f} successful/s, {thr['failures_in_window']} failed "
            f"{ {k: v for k, v in thr['outcomes'].items() if k != 'success'} or ''}{_cpu_note(thr)}")
        target["workloads"][name] = figures
    return target


def _private_state_env(tmp: Path) -> dict[str, str]:
    """A state dir of its own (runtimes linked from the configured one) and a uid range of its own."""
    try:
        from execbox.settings import Settings

        settings = Settings.load()
    except Exception as exc:  # not importable, or a bad setting: let the service itself say so
        log(f"cannot read execbox settings ({exc}); spawned services use the configured state")
        return {}
    tmp.chmod(0o755)  # sandboxes run as unprivileged uids and bind files from under it
    state = tmp / "state"
    state.mkdir(mode=0o755)
    (state / "runtimes").symlink_to(settings.runtime_dir.resolve())
    # the in-process measurement uses [base + count, base + count + 16); services come after it
    return {
        "SANDBOX_STATE_DIR": str(state),
        "SANDBOX_UID_BASE": str(settings.uid_base + settings.uid_count + 16),
        "SANDBOX_UID_COUNT": str(settings.uid_count),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # execbox's own warnings (in-process sandboxes) stay visible, marked as such
    logging.basicConfig(level=logging.WARNING, format="[library %(name)s] %(levelname)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    result: dict[str, Any] = {
        "machine": machine_info(REPO),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "workloads": {n: {"language": WORKLOADS[n].language, "code": WORKLOADS[n].code} for n in args.workloads},
        "targets": [],
    }
    n_targets = len(args.url) + len(args.spawn_backends)
    bound = n_targets * len(args.workloads) * (
        args.phase_budget + args.duration + args.timeout + 70 + 2 * args.wait_quiet
    )
    log(f"{n_targets} target(s) x {len(args.workloads)} workload(s); the run ends within ~{bound / 60:.0f} min "
        f"(typically much sooner)")

    languages = list(dict.fromkeys(WORKLOADS[w].language for w in args.workloads))
    if args.backends:
        quiet: dict[str, Any] = {}
        _check_quiet(quiet, "sandbox_cost", "in-process sandbox", args.wait_quiet)
        result["sandbox_cost_background_busy_cores"] = quiet["_bg_sandbox_cost"]
        log(f"sandbox cost in-process: backends {args.backends}, runtimes {languages}, {args.repeats} each")
        result["sandbox_cost"] = measure_backends(args.backends, languages, repeats=args.repeats,
                                                  settle_s=args.settle, log=log)
    else:
        result["sandbox_cost"] = {}

    log("process-start floors (bare interpreters, same run)")
    result["floors_ms"] = measure_floors()

    for index, url in enumerate(args.url):
        label = args.label[index] if index < len(args.label) else None
        if "=" in url.split("://", 1)[0]:  # NAME=URL
            label, url = url.split("=", 1)
        pid = _local_pid(url, args.service_pid) if index == 0 or args.service_pid == "auto" else None
        result["targets"].append(bench_target(url.rstrip("/"), label, args, pid))

    for backend in args.spawn_backends:
        with tempfile.TemporaryDirectory(prefix=f"execbox-bench-serve-{backend}-") as tmp:
            extra_env = {} if args.spawn_shared_state else _private_state_env(Path(tmp))
            log(f"starting an execbox service with SANDBOX_BACKEND={backend}")
            service, reason = spawn_service(backend, REPO, args.out, extra_env, ready_timeout_s=120.0)
            if service is None:
                log(f"skipping backend {backend}: {reason}")
                result["targets"].append({"label": backend, "backend": backend, "spawned": True,
                                          "skipped": reason.splitlines()[0] if reason else "did not start",
                                          "skipped_detail": reason, "workloads": {}})
                continue
            try:
                target = bench_target(service.url, backend, args, service.process.pid)
                target["spawned"] = True
                target["service_log"] = str(service.log_path)
                result["targets"].append(target)
            finally:
                code = service.stop()
                log(f"stopped the {backend} service (exit {code}); its log: {service.log_path}")

    result["elapsed_s"] = round(time.monotonic() - started, 1)
    result["machine"]["load_average_at_end"] = os.getloadavg()
    json_path = args.out / f"bench-{stamp}.json"
    png_path = args.out / f"bench-{stamp}.png"
    json_path.write_text(json.dumps(result, indent=1, default=str))
    chart_problem = chart(result, png_path)
    for src, name in ((json_path, "latest.json"), (png_path, "latest.png")):
        if src.exists():
            shutil.copyfile(src, args.out / name)

    print()
    print(summary_table(result["targets"]))
    floors = result["floors_ms"]
    print()
    print("Process-start floors (median wall ms, this run): " + ", ".join(f"{k} {v}" for k, v in floors.items()))
    for target in result["targets"]:
        for workload, floor in (("python-hello", "python3 -c"), ("python-pandas", "python3 -c import pandas"),
                                ("node-hello", "node -e")):
            p50 = ((target.get("workloads") or {}).get(workload) or {}).get("sequential", {}).get("stats", {}).get("p50_ms")
            if p50 and floors.get(floor):
                print(f"  {target['label']:<12} {workload:<14} p50 {p50:.1f} ms = {p50 / floors[floor]:.2f} x {floor}")
    if result["sandbox_cost"]:
        print()
        print("Sandbox creation (median of %d, in-process) and idle warm sandbox memory:" % args.repeats)
        print(sandbox_table(result["sandbox_cost"]))
    m = result["machine"]
    print()
    print(f"machine: {m['nproc']} CPUs ({m['cpu_model']}), {m['memory_total_mib']} MiB, Linux {m['kernel']}, "
          f"Python {m['python']}, commit {(m['git_commit'] or '?')[:12]}{' (dirty)' if m['git_dirty'] else ''}")
    print(f"JSON: {json_path}")
    print(f"chart: {png_path}" if chart_problem is None else f"chart: not drawn: {chart_problem}")
    print(f"elapsed: {result['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
