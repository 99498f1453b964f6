#!/usr/bin/env python3
"""What packages per request cost, and that an execution without packages pays nothing.

Starts two execbox services from this checkout on one backend (private state directories,
Python only): one with ``SANDBOX_PACKAGES=off``, one with ``SANDBOX_PACKAGES=any``. Then,
over HTTP (``POST /v1/execute``):

1. ``hello`` without packages, alternating between the two services (so that drift and
   noise fall on both alike): p50/p90 of each; the feature being on must not move them;
2. on the second service, the first request naming a package (it is installed: the figure
   is the index's and pip's, not execbox's), then ``--requests`` more with the same set,
   served from the cache (each in a sandbox built for it with the layer mounted).

Example::

    .venv/bin/python bench/packages.py --backend namespaces --requests 100
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path[:0] = [str(BENCH_DIR), str(REPO)]

from httpload import spawn_service  # noqa: E402
from report import percentile  # noqa: E402

HELLO = 'def main():\n    return "hello"\n'
WITH_PACKAGE = "import tabulate\n\n\ndef main():\n    return tabulate.tabulate([[1, 2]], tablefmt='plain')\n"


def _timed(client: httpx.Client, body: dict[str, Any]) -> float:
    started = time.perf_counter()
    response = client.post("/v1/execute", json=body)
    elapsed_ms = (time.perf_counter() - started) * 1000
    if response.status_code != 200 or response.json()["status"] != "success":
        raise SystemExit(f"a request failed: {response.status_code} {response.text[:500]}")
    return elapsed_ms


def _stats(latencies_ms: list[float]) -> dict[str, float | None]:
    ordered = sorted(latencies_ms)
    return {"n": len(ordered), "p50_ms": percentile(ordered, 50), "p90_ms": percentile(ordered, 90)}


def main() -> int:
    parser = argparse.ArgumentParser(prog="bench/packages.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="namespaces", help="namespaces | gvisor")
    parser.add_argument("--requests", type=int, default=100, help="requests per series")
    parser.add_argument("--warmup", type=int, default=10, help="unrecorded requests per service first")
    parser.add_argument("--package", default="tabulate==0.9.0", help="the package of the second phase")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results", help="directory for the JSON and logs")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    from execbox.settings import Settings

    runtimes = Settings.load().runtime_dir.resolve()
    figures: dict[str, Any] = {"backend": args.backend, "package": args.package}
    with tempfile.TemporaryDirectory(prefix="execbox-bench-packages-") as tmp:
        services = {}
        try:
            for mode in ("off", "any"):
                state = Path(tmp) / mode
                state.mkdir(mode=0o755)
                Path(tmp).chmod(0o755)
                (state / "runtimes").symlink_to(runtimes)
                env = {"SANDBOX_STATE_DIR": str(state), "SANDBOX_PACKAGES": mode, "SANDBOX_LANGUAGES": "python"}
                service, reason = spawn_service(args.backend, REPO, args.out, env, ready_timeout_s=120.0)
                if service is None:
                    raise SystemExit(f"the {mode} service did not start: {reason}")
                services[mode] = service
            clients = {mode: httpx.Client(base_url=s.url, timeout=300.0) for mode, s in services.items()}
            hello: dict[str, list[float]] = {"off": [], "any": []}
            for _ in range(args.warmup):
                for client in clients.values():
                    _timed(client, {"code": HELLO})
            for _ in range(args.requests):
                for mode, client in clients.items():
                    hello[mode].append(_timed(client, {"code": HELLO}))
            figures["hello_packages_off"] = _stats(hello["off"])
            figures["hello_packages_any"] = _stats(hello["any"])
            body = {"code": WITH_PACKAGE, "packages": [args.package]}
            figures["package_first_request_ms"] = _timed(clients["any"], body)
            figures["package_cached"] = _stats([_timed(clients["any"], body) for _ in range(args.requests)])
        finally:
            for service in services.values():
                service.stop()
    print(json.dumps(figures, indent=2))
    (args.out / f"packages-{args.backend}-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
