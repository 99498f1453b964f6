"""Installing one request's packages into a directory, outside every sandbox.

Called by :mod:`execbox.service.packages` (which validates the requirements, caches the
result and mounts it); this module only runs the installers and reads what they said.

* **Python**: pip (the service's own, ``python -m pip``) run with ``--python`` set to the
  runtime environment's interpreter, so that wheels are picked for the Python and platform
  that sandboxes run, and the packages the runtime already has count as installed. Two
  steps: ``pip install --dry-run --report`` resolves the set against the runtime
  (``--only-binary=:all:``: source distributions are never considered, so no ``setup.py``
  ever runs), then ``pip install --target <layer> --no-deps`` installs exactly what the
  report lists, pinned. Nothing the runtime has is installed again, and nothing may
  replace it: a resolution that would replace a runtime package is refused.
* **Node.js**: npm with ``--ignore-scripts`` (no lifecycle script of any package runs) and
  ``--git=false`` (no git dependency is fetched). ``npm install --package-lock-only``
  resolves the tree into a lock file without running or unpacking anything; every entry
  must come from the registry (not git, a path or a link); then ``npm ci`` installs it.

Both run in their own process group with a deadline, as an unprivileged user (``nobody``)
when the service is root, with a private cache and ``HOME`` inside the build directory, and
an environment of their own: only index, proxy and TLS settings pass through (``PIP_INDEX_URL``,
``npm_config_registry``... see :data:`PASSED_VARIABLES`), so that the index can be a private
mirror. A failure is classified from the installer's own words: a package that does not exist,
has no version that matches, or has only a source distribution is a
:class:`~execbox.errors.BadRequestError`; an unreachable index, a timeout or anything else is
a :class:`~execbox.errors.PackageInstallError`.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from execbox.errors import BadRequestError, PackageInstallError
from execbox.runtimes.python.packages import normalise_python_name

__all__ = [
    "INSTALLERS",
    "INSTALLER_UID",
    "PASSED_VARIABLES",
    "install_nodejs",
    "install_python",
    "installer_problems",
    "normalise_python_name",
    "npm_failure",
    "pip_failure",
    "remove_tree",
    "seal_layer",
]

#: the user installers run as when the service is root (``nobody``)
INSTALLER_UID = 65534
#: host variables the installers see (index, proxy and TLS settings; never anything else)
PASSED_VARIABLES = (
    "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_NO_INDEX", "PIP_TRUSTED_HOST", "PIP_CERT",
    "PIP_CLIENT_CERT", "PIP_PROXY", "PIP_DEFAULT_TIMEOUT", "PIP_RETRIES", "PIP_CONSTRAINT", "PIP_CONFIG_FILE",
    "npm_config_registry", "npm_config_cafile", "npm_config_strict_ssl", "npm_config_proxy",
    "npm_config_https_proxy", "npm_config_noproxy", "npm_config_userconfig", "npm_config_globalconfig",
    "npm_config_fetch_retries", "npm_config_fetch_retry_mintimeout", "npm_config_fetch_retry_maxtimeout",
    "npm_config_fetch_timeout",
    "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy",
    "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "NODE_EXTRA_CA_CERTS",
)  # fmt: skip
_PIP_COMMON = ("--disable-pip-version-check", "--no-input", "--progress-bar", "off", "--only-binary=:all:")
_NPM_COMMON = ("--ignore-scripts", "--git=false", "--no-audit", "--no-fund", "--omit=dev", "--loglevel=error")
#: the most of an installer's output read back (pip -vv lists every file of a project)
_OUTPUT_MAX_BYTES = 32 << 20


def installer_problems() -> dict[str, str]:
    """Per installer (a key of :data:`INSTALLERS`), why it cannot run here (missing pip or
    npm); {} when both can."""
    problems = {}
    try:
        pip_version = tuple(int(part) for part in importlib.metadata.version("pip").split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        pip_version = (0, 0)
    if importlib.util.find_spec("pip") is None or pip_version < (22, 3):  # 22.3: pip --python
        problems["pip"] = f"pip 22.3 or later is not installed for {sys.executable} (pip install 'pip>=22.3')"
    if shutil.which("npm") is None:
        problems["npm"] = "npm is not installed (apt-get install npm)"
    return problems


# -- running an installer ------------------------------------------------------------------


def _environment(home: Path) -> dict[str, str]:
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(home), "TMPDIR": str(home), "LANG": "C.UTF-8"}
    env.update({name: os.environ[name] for name in PASSED_VARIABLES if name in os.environ})
    return env


def _run(argv: list[str], *, cwd: Path, work: Path, deadline: float, what: str) -> tuple[int, str]:
    """Run one installer step; (exit status, what it printed). PackageInstallError on a timeout."""
    log_path = work / "installer.log"
    user = {"user": INSTALLER_UID, "group": INSTALLER_UID, "extra_groups": []} if os.geteuid() == 0 else {}
    timeout_s = deadline - time.monotonic()
    with open(log_path, "wb") as log:
        try:
            process = subprocess.Popen(
                argv, cwd=cwd, env=_environment(work / "home"), stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True, **user,  # type: ignore[call-overload]
            )  # fmt: skip
        except OSError as exc:
            raise PackageInstallError(f"cannot start {what}: {exc}") from exc
        try:
            status: int = process.wait(timeout=max(timeout_s, 0.001))
        except subprocess.TimeoutExpired as exc:
            raise PackageInstallError(
                f"{what} took longer than SANDBOX_PACKAGES_INSTALL_TIMEOUT and was stopped"
            ) from exc
        finally:  # whatever the installer left running goes with it
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    with open(log_path, "rb") as log:
        return status, log.read(_OUTPUT_MAX_BYTES).decode("utf-8", "replace")


def _error_lines(output: str, marker: str, count: int = 12) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip().startswith(marker)]
    return "\n".join(lines[-count:]) or "\n".join(output.strip().splitlines()[-count:])


# -- the built directory --------------------------------------------------------------------


def remove_tree(path: Path) -> None:
    """rmtree of a read-only layer (directories made writable first; no symlink followed)."""
    if not path.exists() and not path.is_symlink():
        return
    if path.is_dir() and not path.is_symlink():
        for directory, subdirs, _ in os.walk(path):
            with contextlib.suppress(OSError):
                os.chmod(directory, 0o700)
            subdirs[:] = [d for d in subdirs if not os.path.islink(os.path.join(directory, d))]
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def seal_layer(layer: Path) -> int:
    """Make a built layer root's and read-only; its size in bytes (blocks on disk).

    Every entry must be the installer's own (a file it did not create, e.g. a hard link to
    a host file, is refused); symlinks are never followed, only owned over."""
    size = 0
    check = os.geteuid() == 0
    for directory, subdirs, files in os.walk(layer):
        names = [os.path.join(directory, name) for name in (*subdirs, *files)]
        for path in [str(layer), *names] if directory == str(layer) else names:
            info = os.lstat(path)
            if check and info.st_uid != INSTALLER_UID:
                raise PackageInstallError(f"the installer left {path} owned by uid {info.st_uid}: refused")
            size += info.st_blocks * 512
            if check:
                os.lchown(path, 0, 0)
            if os.path.islink(path):
                continue
            executable = info.st_mode & 0o111 or stat.S_ISDIR(info.st_mode)
            os.chmod(path, 0o555 if executable else 0o444)
    return size


# -- Python --------------------------------------------------------------------------------


def _runtime_distributions(runtime_env_dir: Path) -> dict[str, str]:
    """normalised name -> version of every distribution in the runtime's site-packages."""
    found = {}
    for info in runtime_env_dir.glob("lib/python3*/site-packages/*.dist-info"):
        name, _, version = info.name.removesuffix(".dist-info").partition("-")
        found[normalise_python_name(name)] = version
    return found


def install_python(layer: Path, work: Path, requirements: tuple[str, ...], runtime_env_dir: Path, timeout_s: float) -> list[str]:
    """Install ``requirements`` (canonical, validated) into ``layer/python``; returns the
    ``name==version`` installed there (empty when the runtime has them all)."""
    deadline = time.monotonic() + timeout_s
    pip = [sys.executable, "-m", "pip", "--python", str(runtime_env_dir / "bin" / "python3")]
    cache = str(work / "home" / "pip-cache")
    (work / "requested.txt").write_text("".join(f"{r}\n" for r in requirements))
    report = work / "report.json"
    status, output = _run(
        [*pip, "install", "-vv", "--dry-run", "--report", str(report), "--cache-dir", cache, *_PIP_COMMON,
         "-r", str(work / "requested.txt")],
        cwd=work, work=work, deadline=deadline, what="pip (resolving the packages)",
    )  # fmt: skip
    if status != 0:
        raise pip_failure(output, requirements)
    try:
        items = json.loads(report.read_text())["install"]
        resolved = [(str(i["metadata"]["name"]), str(i["metadata"]["version"])) for i in items]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PackageInstallError(f"pip's resolution report is unreadable: {exc}") from exc
    runtime = _runtime_distributions(runtime_env_dir)
    replaced = [f"{n} {v} (the runtime has {runtime[normalise_python_name(n)]})"
                for n, v in resolved if normalise_python_name(n) in runtime]  # fmt: skip
    if replaced:
        raise BadRequestError(
            "these packages would replace packages of the runtime, which a request cannot do: "
            + ", ".join(replaced) + "; ask for versions the runtime's packages satisfy"
        )
    pinned = sorted(f"{name}=={version}" for name, version in resolved)
    if not pinned:
        return []
    (work / "pinned.txt").write_text("".join(f"{p}\n" for p in pinned))
    status, output = _run(
        [*pip, "install", "--target", str(layer / "python"), "--no-deps", "--no-warn-script-location",
         "--cache-dir", cache, *_PIP_COMMON, "-r", str(work / "pinned.txt")],
        cwd=work, work=work, deadline=deadline, what="pip (installing the packages)",
    )  # fmt: skip
    if status != 0:
        raise PackageInstallError("pip could not install the resolved packages:\n" + _error_lines(output, "ERROR:"))
    return pinned


def pip_failure(output: str, requirements: tuple[str, ...]) -> Exception:
    """The error for a failed resolution, from what ``pip -vv`` printed."""
    errors = _error_lines(output, "ERROR:")
    missing = re.search(r"No matching distribution found for ([A-Za-z0-9][A-Za-z0-9._-]*)", output)
    if missing is None:
        if "conflicting dependencies" in errors or "ResolutionImpossible" in errors:
            return BadRequestError(f"the packages cannot be installed together:\n{errors}")
        if "Invalid requirement" in errors:
            return BadRequestError(f"pip refused a requirement:\n{errors}")
        return PackageInstallError(f"pip could not resolve the packages:\n{errors}")
    name = normalise_python_name(missing.group(1))
    requested = {normalise_python_name(re.split(r"[=<>!~]", r, maxsplit=1)[0]) for r in requirements}
    who = name if name in requested else f"{name} (a dependency of the requested packages)"
    page = rf"/simple/{re.escape(name)}/"
    versions = re.search(rf"requirement {re.escape(missing.group(1))}\S* \(from versions: ([^)]*)\)", output)
    available = versions.group(1).strip() if versions else "none"
    if available != "none":
        listed = ", ".join(available.split(", ")[-12:])
        return BadRequestError(f"no version of {who} matches the request; versions with a binary wheel: {listed}")
    sources = [m for m in re.findall(r"No sources permitted for ([^:\s]+)", output) if normalise_python_name(m) == name]
    wheels_elsewhere = re.search(rf"(none of the wheel's tags|requires a different Python).*{page}", output, re.I)
    if sources and not wheels_elsewhere:
        return BadRequestError(
            f"{who} has only source distributions (sdist) on the index: only binary wheels are installed, "
            "so that no package's setup code runs"
        )
    if sources or wheels_elsewhere:
        return BadRequestError(f"{who} has no binary wheel for the sandboxes' Python and platform")
    if re.search(rf"404 Client Error.*{page}", output, re.I) or not re.search(
        r"Could not fetch URL|NewConnectionError|Max retries exceeded|ConnectTimeout", output
    ):
        return BadRequestError(f"{who} does not exist on the package index")
    return PackageInstallError(f"the package index could not be reached:\n{errors}")


# -- Node.js -------------------------------------------------------------------------------


def install_nodejs(
    layer: Path, work: Path, requirements: tuple[str, ...], runtime_env_dir: Path, timeout_s: float
) -> list[str]:
    """Install ``requirements`` (canonical ``name@spec``) into ``layer/node_modules``;
    returns the ``name@version`` of every package installed there. (``runtime_env_dir`` is
    not read: npm resolves the set on its own, the runtime's packages come after the layer
    on NODE_PATH.)"""
    deadline = time.monotonic() + timeout_s
    npm = shutil.which("npm") or "npm"
    dependencies = dict(r.rsplit("@", 1) if r.rfind("@") > 0 else (r, "*") for r in requirements)
    manifest = {"name": "execbox-packages", "private": True, "dependencies": dependencies}
    (layer / "package.json").write_text(json.dumps(manifest, indent=2) + "\n")
    if os.geteuid() == 0:  # the layer holds only the installer's files (see packages.seal_layer)
        os.chown(layer / "package.json", INSTALLER_UID, INSTALLER_UID)
    cache = str(work / "home" / "npm-cache")
    status, output = _run(
        [npm, "install", "--package-lock-only", "--cache", cache, *_NPM_COMMON],
        cwd=layer, work=work, deadline=deadline, what="npm (resolving the packages)",
    )
    if status != 0:
        raise npm_failure(output)
    try:
        entries = json.loads((layer / "package-lock.json").read_text())["packages"]
    except (OSError, ValueError, KeyError) as exc:
        raise PackageInstallError(f"npm's lock file is unreadable: {exc}") from exc
    installed = []
    for path, entry in entries.items():
        if not path:
            continue
        name = path.rpartition("node_modules/")[2]
        resolved = str(entry.get("resolved", ""))
        if entry.get("link") or (resolved and not (resolved.startswith(("https://", "http://")) and "/-/" in resolved)):
            raise BadRequestError(
                f"{name} would come from {resolved or 'a link'}, not from the registry: only registry packages are installed"
            )
        installed.append(f"{name}@{entry.get('version', '?')}")
    status, output = _run(
        [npm, "ci", "--cache", cache, *_NPM_COMMON],
        cwd=layer, work=work, deadline=deadline, what="npm (installing the packages)",
    )
    if status != 0:
        raise npm_failure(output)
    return sorted(installed)


def npm_failure(output: str) -> Exception:
    """The error for a failed npm step, from what it printed."""
    errors = _error_lines(output, "npm error")
    code = re.search(r"npm error code (E[A-Z0-9]+)", output)
    kind = code.group(1) if code else ""
    if kind == "E404":
        url = re.search(r"404 Not Found - GET (\S+)", output)
        name = url.group(1).rstrip("/").rpartition("/")[2].replace("%2f", "/").replace("%2F", "/") if url else "a package"
        return BadRequestError(f"{name} does not exist on the npm registry")
    if kind == "ETARGET":
        wanted = re.search(r"No matching version found for (\S+?)\.?$", output, re.M)
        return BadRequestError(f"no version matches {wanted.group(1) if wanted else 'a requirement'} on the npm registry")
    if kind in ("EINVALIDTAGNAME", "EINVALIDPACKAGENAME", "EINVALIDTYPE", "EUNSUPPORTEDPROTOCOL"):
        return BadRequestError(f"npm refused a requirement:\n{errors}")
    if kind == "ERESOLVE":
        return BadRequestError(f"the packages cannot be installed together:\n{errors}")
    if "git" in errors.lower() and ("spawn" in errors or "ENOENT" in errors or "dep preparation" in errors):
        return BadRequestError(f"a dependency comes from git, which is refused: only registry packages are installed\n{errors}")
    if kind in ("ENOTFOUND", "ECONNREFUSED", "ETIMEDOUT", "EAI_AGAIN", "ECONNRESET", "EHOSTUNREACH"):
        return PackageInstallError(f"the npm registry could not be reached:\n{errors}")
    return PackageInstallError(f"npm could not install the packages:\n{errors}")


#: the installers by name (``PackageGrammar.installer``): (layer, work directory, canonical
#: requirements, runtime environment, timeout) -> what was installed (empty: nothing to mount)
INSTALLERS: dict[str, Callable[[Path, Path, tuple[str, ...], Path, float], list[str]]] = {
    "pip": install_python,
    "npm": install_nodejs,
}
