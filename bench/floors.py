"""Process-start floors, measured in the same run as the service figures.

The latency targets are ratios to what the bare interpreters cost on this machine at that
moment: ``/usr/bin/python3 -c 'print(1)'`` and ``node -e 'console.log(1)'``, the latter
without ``NODE_EXTRA_CA_CERTS`` (which costs every ``node`` start ~80 ms here and is never
let into sandboxes). A floor is the median wall time of ``repeats`` sequential starts.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import time

__all__ = ["FLOOR_COMMANDS", "measure_floors"]

FLOOR_COMMANDS = {
    "python3 -c": ["/usr/bin/python3", "-c", "print(1)"],
    "python3 -c import pandas": ["/usr/bin/python3", "-c", "import pandas; print(1)"],
    "node -e": ["/usr/bin/node", "-e", "console.log(1)"],
}


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "NODE_EXTRA_CA_CERTS"}


def measure_floors(repeats: int = 20) -> dict[str, float]:
    """Median wall ms of each floor command (commands whose binary is missing are left out)."""
    env = _clean_env()
    floors: dict[str, float] = {}
    for name, argv in FLOOR_COMMANDS.items():
        if not os.path.exists(argv[0]):
            continue
        if "pandas" in name:  # the runtime's venv has pandas; the system Python may not
            venv_python = "/var/lib/execbox/runtimes/python/bin/python3"
            if not os.path.exists(venv_python):
                continue
            argv = [venv_python, *argv[1:]]
        samples = []
        for _ in range(repeats):
            started = time.perf_counter()
            done = subprocess.run(argv, env=env, capture_output=True, check=False, timeout=60)
            if done.returncode != 0:
                break
            samples.append((time.perf_counter() - started) * 1000.0)
        if samples:
            floors[name] = round(statistics.median(samples), 1)
    return floors
