"""Build the runtime environments that sandboxes see read-only (``execbox build``).

* ``venv`` (python): a venv of the system's ``/usr/bin/python3`` with ``runtimes/python/requirements.txt``
  installed, and matplotlib's font cache prepared (sandboxes copy it into their /tmp);
* ``npm`` (nodejs): ``npm install`` of ``runtimes/nodejs/package.json``.

Which builder serves a runtime is the runtime's own declaration (``Runtime.builder``, a key
of :data:`BUILDERS`); a builder is named for its tool, not its language, so that another
language built the same way reuses it.

A build is skipped when the packages file and the interpreter are unchanged since the
last successful build (a stamp file records both), so running it twice is cheap.

A build says what it does as it goes (``progress``, one line a step: which runtime, step
n of m, the packages being installed, the time taken); pip and npm print their own lines
(pip: each package as it is collected and installed) between them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from execbox.errors import RuntimeEnvironmentError
from execbox.runtimes import RUNTIMES, Runtime

__all__ = ["BUILDERS", "build_all", "build_runtime", "environment_ready"]

_STAMP = ".execbox-build.json"
#: receives one line of progress at a time
Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def _packages(runtime: Runtime) -> list[str]:
    """The packages a runtime's packages file names (for the progress lines)."""
    if runtime.packages_file.suffix == ".json":
        try:
            return sorted(json.loads(runtime.packages_file.read_text()).get("dependencies", {}))
        except (OSError, ValueError):
            return []
    lines = runtime.packages_file.read_text().splitlines()
    return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]


def _fingerprint(runtime: Runtime) -> dict[str, str]:
    interpreter = runtime.interpreter
    digest = hashlib.sha256(runtime.packages_file.read_bytes()).hexdigest()
    real = interpreter.resolve()
    return {"packages_sha256": digest, "interpreter": str(real), "interpreter_mtime": str(real.stat().st_mtime_ns)}


def environment_ready(runtime: Runtime, runtime_dir: Path) -> bool:
    """Whether the environment exists and matches the packages file."""
    stamp = runtime.env_dir(runtime_dir) / _STAMP
    try:
        return json.loads(stamp.read_text()) == _fingerprint(runtime)
    except (OSError, ValueError):
        return False


def _run(argv: list[str], what: str, **kwargs: object) -> None:
    try:
        subprocess.run(argv, check=True, **kwargs)  # type: ignore[call-overload]
    except (OSError, subprocess.CalledProcessError) as exc:
        raise RuntimeEnvironmentError(f"{what} failed: {exc}") from exc


def _build_venv(runtime: Runtime, target: Path, progress: Progress) -> None:
    """A venv of the runtime's interpreter with its requirements, without pip; matplotlib's
    font cache prepared in ``mplconfig/``."""
    python = runtime.interpreter
    if not python.exists():
        raise RuntimeEnvironmentError(f"{python} is missing: apt-get install python3 python3-venv")
    progress(f"{runtime.name}: [1/4] creating a venv of {python}")
    _run([str(python), "-m", "venv", str(target)], "creating the Python venv (apt-get install python3-venv)")
    pip = [str(target / "bin" / "python3"), "-m", "pip", "--disable-pip-version-check", "--no-input"]
    packages = _packages(runtime)
    progress(f"{runtime.name}: [2/4] pip install of {len(packages)} packages: {', '.join(packages)}")
    _run([*pip, "install", "--no-cache-dir", "--progress-bar", "off", "-r", str(runtime.packages_file)], "pip install")
    progress(f"{runtime.name}: [3/4] removing pip from the sandbox environment")
    _run([*pip, "uninstall", "--quiet", "--yes", "pip"], "removing pip from the sandbox environment")
    progress(f"{runtime.name}: [4/4] preparing matplotlib's font cache")
    cache = target / "mplconfig"
    cache.mkdir()
    env = {"MPLCONFIGDIR": str(cache), "MPLBACKEND": "Agg", "PATH": "/usr/bin:/bin"}
    probe = "import importlib.util as u\nif u.find_spec('matplotlib'):\n    import matplotlib.pyplot"
    _run([str(target / "bin" / "python3"), "-c", probe], "preparing matplotlib's font cache", env=env)


def _build_npm(runtime: Runtime, target: Path, progress: Progress) -> None:
    """``npm install`` of the runtime's package.json (and its lock file) in the environment."""
    npm = shutil.which("npm")
    if not runtime.interpreter.exists() or npm is None:
        raise RuntimeEnvironmentError("node and npm are missing: apt-get install nodejs npm")
    packages = _packages(runtime)
    progress(f"{runtime.name}: [1/1] npm install of {len(packages)} packages: {', '.join(packages)}")
    target.mkdir(parents=True)
    shutil.copyfile(runtime.packages_file, target / "package.json")
    lock = runtime.packages_file.with_name("package-lock.json")
    if lock.exists():
        shutil.copyfile(lock, target / "package-lock.json")
    _run([npm, "install", "--omit=dev", "--no-audit", "--no-fund", "--loglevel=notice"], "npm install", cwd=target)


#: the environment builders by name (``Runtime.builder``): (runtime, staging directory, progress)
BUILDERS: dict[str, Callable[[Runtime, Path, Progress], None]] = {"venv": _build_venv, "npm": _build_npm}


def build_runtime(runtime: Runtime, runtime_dir: Path, force: bool = False, progress: Progress = _quiet) -> bool:
    """Build one environment; returns False when it was already up to date."""
    if not force and environment_ready(runtime, runtime_dir):
        return False
    started = time.monotonic()
    target = runtime.env_dir(runtime_dir)
    staging = target.with_name(target.name + ".building")
    shutil.rmtree(staging, ignore_errors=True)
    staging.parent.mkdir(parents=True, exist_ok=True)
    BUILDERS[runtime.builder](runtime, staging, progress)
    (staging / _STAMP).write_text(json.dumps(_fingerprint(runtime)))
    for path in [staging, *staging.rglob("*")]:  # sandboxes run as other uids: world-readable
        if not path.is_symlink():
            path.chmod(path.stat().st_mode | 0o444 | (0o111 if path.is_dir() else 0))
    old = target.with_name(target.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.rename(target, old)
    os.rename(staging, target)
    shutil.rmtree(old, ignore_errors=True)
    progress(f"{runtime.name}: built in {time.monotonic() - started:.1f}s")
    return True


def build_all(runtime_dir: Path, force: bool = False, progress: Progress = _quiet) -> dict[str, bool]:
    """Build every runtime environment; maps runtime name -> whether it was (re)built."""
    built = {}
    runtimes = list(RUNTIMES.values())
    for number, runtime in enumerate(runtimes, 1):
        if not force and environment_ready(runtime, runtime_dir):
            built[runtime.name] = False
            continue
        progress(f"building runtime {number} of {len(runtimes)}: {runtime.name} in {runtime.env_dir(runtime_dir)}")
        built[runtime.name] = build_runtime(runtime, runtime_dir, force=True, progress=progress)
    return built
