"""Drive a service over HTTP: sequential latency, sustained throughput, and what it says it is.

Every request has a timeout; every failure (transport error, HTTP error, a verdict other
than ``success``, a wrong result) is counted by kind and never raises.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from procstat import TreeCpu
from workloads import Workload

__all__ = [
    "Sample",
    "background_busy_cores",
    "SpawnedService",
    "run_sequential",
    "run_throughput",
    "service_info",
    "spawn_service",
    "wait_pools_full",
]

_HEADERS = {"content-type": "application/json", "accept": "application/json"}


@dataclass(frozen=True)
class Sample:
    #: perf_counter when the answer (or the failure) arrived
    end_s: float
    latency_ms: float
    ok: bool
    #: "success", or the kind of failure: "status:<status>[:<detail>]", "http_<code>", "timeout", ...
    outcome: str


def _cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return sum(values) - idle, sum(values)


def machine_cpu(before: tuple[int, int], after: tuple[int, int], client_cpu_s: float, successes: int) -> dict[str, Any]:
    """What the whole machine spent between two _cpu_jiffies() readings: busy CPUs on average,
    and CPU ms per success once the load generator's own CPU is taken out (meaningful on an
    otherwise idle machine only)."""
    busy, total = after[0] - before[0], after[1] - before[1]
    if total <= 0:
        return {"machine_busy_cores": None}
    busy_s = busy / os.sysconf("SC_CLK_TCK")
    figures: dict[str, Any] = {
        "machine_busy_cores": round(busy / total * (os.cpu_count() or 1), 2),
        "machine_busy_cpu_s": round(busy_s, 3),
    }
    if successes:
        figures["machine_cpu_ms_per_success_excl_client"] = round((busy_s - client_cpu_s) * 1000 / successes, 3)
    return figures


def background_busy_cores(seconds: float = 1.0) -> float | None:
    """CPUs the machine keeps busy while we send nothing (the service idle, its pools full)."""
    before = _cpu_jiffies()
    time.sleep(seconds)
    return machine_cpu(before, _cpu_jiffies(), 0.0, 0)["machine_busy_cores"]


def _client(base_url: str, timeout_s: float) -> httpx.Client:
    # one keep-alive connection per client; one client per worker thread
    return httpx.Client(
        base_url=base_url,
        timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 5.0)),
        limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
        headers=_HEADERS,
    )


def _classify(response: httpx.Response, workload: Workload) -> tuple[bool, str]:
    if response.status_code != 200:
        return False, f"http_{response.status_code}"
    try:
        data = json.loads(response.content)
    except ValueError:
        return False, "bad_json"
    if not isinstance(data, dict):
        return False, "bad_json"
    status = data.get("status")
    if status != "success":
        detail = data.get("detail")
        return False, f"status:{status}" + (f":{detail}" if status == "program_runner_error" and detail else "")
    result = data.get("result")
    if isinstance(result, dict) and result.get("present") and result.get("value") != workload.expected:
        return False, "wrong_result"
    return True, "success"


def post_run(client: httpx.Client, body: bytes, workload: Workload) -> Sample:
    started = time.perf_counter()
    try:
        response = client.post("/run", content=body)
        ok, outcome = _classify(response, workload)
    except httpx.TimeoutException:
        ok, outcome = False, "timeout"
    except httpx.ConnectError:
        ok, outcome = False, "connect_error"
    except httpx.HTTPError as exc:
        ok, outcome = False, f"transport_error:{type(exc).__name__}"
    except Exception as exc:  # never let one request end the run
        ok, outcome = False, f"client_error:{type(exc).__name__}"
    ended = time.perf_counter()
    if outcome == "connect_error":
        time.sleep(0.05)  # a dead service must not turn the loop into a busy spin
    return Sample(ended, (ended - started) * 1000.0, ok, outcome)


def _service_cpu(cpu: dict[str, float] | None, successes: int) -> dict[str, Any] | None:
    if cpu is None:
        return None
    per = {f"{k.removesuffix('_s')}_ms_per_success": round(v * 1000 / successes, 3) for k, v in cpu.items()} \
        if successes else {}
    return {**cpu, **per}


def run_sequential(
    base_url: str, workload: Workload, *, requests: int, warmup: int, timeout_s: float, budget_s: float,
    service_cpu: TreeCpu | None = None,
) -> dict[str, Any]:
    """``warmup`` unrecorded requests, then ``requests`` one after the other (within ``budget_s``)."""
    body = workload.body()
    samples: list[Sample] = []
    warm_outcomes: Counter[str] = Counter()
    truncated = False
    with _client(base_url, timeout_s) as client:
        for _ in range(warmup):
            warm_outcomes[post_run(client, body, workload).outcome] += 1
        deadline = time.perf_counter() + budget_s
        started = time.perf_counter()
        jiffies = _cpu_jiffies()
        cpu_before = time.process_time()
        tree_before = service_cpu.read() if service_cpu else None
        for _ in range(requests):
            if time.perf_counter() >= deadline:
                truncated = True
                break
            samples.append(post_run(client, body, workload))
        elapsed = time.perf_counter() - started
        client_cpu_s = time.process_time() - cpu_before
        machine = machine_cpu(jiffies, _cpu_jiffies(), client_cpu_s, sum(s.ok for s in samples))
        tree = service_cpu.since(tree_before) if service_cpu else None
    return {
        "requested": requests,
        "sent": len(samples),
        "truncated_by_budget": truncated,
        "budget_s": budget_s,
        "elapsed_s": round(elapsed, 3),
        "warmup": warmup,
        "warmup_outcomes": dict(warm_outcomes),
        "client_cpu_s": round(client_cpu_s, 3),
        **machine,
        "service_cpu": _service_cpu(tree, sum(s.ok for s in samples)),
        "latencies_ms": [round(s.latency_ms, 3) for s in samples],
        "ok": [s.ok for s in samples],
        "outcomes": dict(Counter(s.outcome for s in samples)),
    }


def run_throughput(
    base_url: str, workload: Workload, *, concurrency: int, duration_s: float, timeout_s: float,
    service_cpu: TreeCpu | None = None,
) -> dict[str, Any]:
    """``concurrency`` closed-loop clients for ``duration_s``; counts what completes in the window."""
    body = workload.body()
    per_worker: list[list[Sample]] = [[] for _ in range(concurrency)]
    barrier = threading.Barrier(concurrency + 1)
    window: dict[str, float] = {}

    def worker(index: int) -> None:
        with _client(base_url, timeout_s) as client:
            try:
                barrier.wait(timeout=30)
            except threading.BrokenBarrierError:
                return
            deadline = window["end"]
            out = per_worker[index]
            while time.perf_counter() < deadline:
                out.append(post_run(client, body, workload))

    threads = [threading.Thread(target=worker, args=(i,), daemon=True, name=f"bench-{i}") for i in range(concurrency)]
    for thread in threads:
        thread.start()
    cpu_before = time.process_time()
    jiffies = _cpu_jiffies()
    tree_before = service_cpu.read() if service_cpu else None
    window["start"] = time.perf_counter()
    window["end"] = window["start"] + duration_s
    try:
        barrier.wait(timeout=30)
    except threading.BrokenBarrierError:
        pass
    # bounded: a request started just before the end may take up to timeout_s
    join_deadline = window["end"] + timeout_s + 5.0
    for thread in threads:
        thread.join(max(0.0, join_deadline - time.perf_counter()))
    jiffies_after = _cpu_jiffies()
    tree = service_cpu.since(tree_before) if service_cpu else None
    stuck = sum(t.is_alive() for t in threads)
    client_cpu_s = time.process_time() - cpu_before
    samples = [s for worker_samples in per_worker for s in worker_samples]
    machine = machine_cpu(jiffies, jiffies_after, client_cpu_s, sum(s.ok for s in samples))
    in_window = [s for s in samples if s.end_s <= window["end"]]
    late = [s for s in samples if s.end_s > window["end"]]
    successes = sum(s.ok for s in in_window)
    return {
        "concurrency": concurrency,
        "duration_s": duration_s,
        "completed_in_window": len(in_window),
        "successes_in_window": successes,
        "failures_in_window": len(in_window) - successes,
        "throughput_per_s": successes / duration_s,
        "attempts_per_s": len(in_window) / duration_s,
        "finished_after_window": len(late),
        "stuck_workers": stuck,
        "client_cpu_s": round(client_cpu_s, 3),
        **machine,
        # over the window and its tail: divided by every success, late ones included
        "service_cpu": _service_cpu(tree, sum(s.ok for s in samples)),
        "outcomes": dict(Counter(s.outcome for s in in_window)),
        "latencies_ms": [round(s.latency_ms, 3) for s in in_window],
        "ok": [s.ok for s in in_window],
    }


def service_info(base_url: str, timeout_s: float = 5.0) -> dict[str, Any]:
    """``GET /v1/info`` (execbox): backend name and pools; ``backend: unknown`` for other services."""
    info: dict[str, Any] = {"backend": "unknown"}
    try:
        with _client(base_url, timeout_s) as client:
            response = client.get("/v1/info")
            if response.status_code == 200:
                data = response.json()
                if isinstance(data, dict) and data.get("backend"):
                    info = {**data, "backend": str(data["backend"])}
            else:
                info["info_status"] = response.status_code
            health = client.get("/healthz")
            info["healthz_status"] = health.status_code
    except (httpx.HTTPError, ValueError) as exc:
        info["error"] = f"{type(exc).__name__}: {exc}"
    return info


def wait_pools_full(base_url: str, timeout_s: float) -> bool:
    """Wait until every pool /v1/info reports is back to its size (no-op for other services)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        info = service_info(base_url, timeout_s=2.0)
        pools = info.get("pools")
        if not isinstance(pools, list) or not pools:
            return True
        if all(p.get("ready", 0) >= p.get("size", 0) for p in pools if isinstance(p, dict)):
            return True
        time.sleep(0.1)
    return False


# -- a service of our own per backend ------------------------------------------------------


@dataclass
class SpawnedService:
    backend: str
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def stop(self, timeout_s: float = 60.0) -> int | None:
        """SIGTERM (uvicorn's graceful shutdown destroys every sandbox), SIGKILL if it hangs."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
                self.process.wait(10)
        return self.process.returncode

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def spawn_service(
    backend: str, repo: Path, log_dir: Path, extra_env: dict[str, str], ready_timeout_s: float
) -> tuple[SpawnedService | None, str]:
    """Start ``python -m execbox.cli serve`` with SANDBOX_BACKEND=backend; wait for /healthz 200.

    Returns the service, or None and the reason it did not come up.
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = log_dir / f"service-{backend}-{port}.log"
    env = {**os.environ, **extra_env, "SANDBOX_BACKEND": backend}
    env.pop("SANDBOX_EXECUTOR_MANAGER_PORT", None)
    log_file = log_path.open("wb")
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "execbox.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
            cwd=repo, env=env, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
        )
    except OSError as exc:
        return None, f"cannot start the service: {exc}"
    finally:
        log_file.close()
    service = SpawnedService(backend, url, process, log_path)
    deadline = time.monotonic() + ready_timeout_s
    with httpx.Client(base_url=url, timeout=2.0) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                return None, f"the service exited with {process.returncode}: {service.log_tail()}"
            with contextlib.suppress(httpx.HTTPError):
                if client.get("/healthz").status_code == 200:
                    return service, ""
            time.sleep(0.2)
    service.stop()
    return None, f"/healthz not 200 within {ready_timeout_s:g}s: {service.log_tail()}"
