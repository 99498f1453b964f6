"""Packages per request: a read-only layer of packages, installed outside the sandbox,
cached by the set of requirements, mounted next to the runtime.

A request (``/v1/execute`` or a session) may name ``packages``, e.g. ``["tabulate==0.9.0"]``
or ``["is-number@7.0.0"]``, when ``SANDBOX_PACKAGES`` allows it (``off`` by default; ``any``;
or an allowlist of names). Then:

1. **Validation, before any I/O** (:func:`parse_requirements`): a name, optionally a version
   specifier (Python ``==1.2``, ``>=1,<2``...; npm ``@1.2.3``, ``@^1.2``, or ``==1.2.3``);
   never a URL, a path, an option, a marker, an extra or ``git+``. Then the allowlist.
2. **The layer**, named by a hash of the language, the canonical sorted requirements and the
   runtime environment's build stamp, under ``<SANDBOX_STATE_DIR>/packages/<key>``. A layer that
   exists is used at once (a lock, a stat and a touch: the second request with the same set
   pays no installation). Otherwise it is built in a private directory by
   :mod:`execbox.service.package_install` (binary wheels only, no install scripts, as
   ``nobody``), checked to hold only the installer's own files, made read-only and owned by
   root, and renamed into place. A per-key ``flock`` (exclusive while building, shared while
   in use) makes two concurrent requests for one set build it once, across processes too.
3. **The cache**: ``<key>.json`` beside each layer records what it holds and its size; its
   mtime is the last use. After a build, or when a layer in use is let go of while the cache
   is above ``SANDBOX_PACKAGES_CACHE_SIZE``, the least recently used layers that no sandbox
   holds (their lock is free) are removed until it fits; one layer alone above the size is
   refused. A Python set the runtime already satisfies has an empty layer: nothing is mounted.
4. **The sandbox** (:func:`package_spec`): the session spec of the language plus the layer
   mounted read-only at ``/opt/packages``; ``PYTHONPATH=/opt/packages/python`` (the Python
   driver starts with ``-s -P`` instead of ``-I`` so that the interpreter honours it, and
   child Pythons too; the environment is still entirely the spec's) or ``NODE_PATH`` with
   ``/opt/packages/node_modules`` first. It is built for the request, used once (or for the
   session's life) and destroyed; the layer's lock is let go of with it
   (:class:`LayeredSandbox`).

**Why a sandbox of its own, and why bwrap on the namespaces backend.** Warm pool sandboxes
are prepared before a request exists, without any layer, so they cannot serve one; requests
without packages keep using them and pay nothing. The namespaces backend's fork server is
one zygote per spec (a Python that imported numpy and pandas, about a second to start and
tens of MB held): one per package set would start a zygote per set and keep them all.
Making the zygote mount a per-sandbox layer would not do either: its preloaded modules and
import caches predate the layer. So a package request on that backend uses a bwrap-launched
sandbox of the same backend (:func:`packages_backend`: the same inner wall, a fresh
interpreter that sees the layer from its first import; its cost is an interpreter start, with
no zygote to keep). On gVisor the spec is ``dedicated`` like a session's: a gVisor sandbox of
its own, whose bundle binds the layer.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from execbox.errors import BadRequestError, ExecboxError, PackageInstallError
from execbox.isolation.base import IsolationBackend, Mount, OutputSink, RunOutcome, Sandbox, SandboxSpec
from execbox.models import ExecutionRequest, Language, Limits
from execbox.runtimes import RUNTIMES, get_runtime
from execbox.service.backends import build_backend
from execbox.service.package_install import (
    INSTALLER_UID,
    INSTALLERS,
    installer_problems,
    remove_tree,
    seal_layer,
)
from execbox.settings import Settings

__all__ = [
    "FAILURE_MEMORY_S",
    "MAX_REQUIREMENTS",
    "PACKAGES_MOUNT",
    "LayerLease",
    "LayeredSandbox",
    "PackageCache",
    "layer_key",
    "package_spec",
    "packages_backend",
    "parse_requirements",
    "requirement_name",
]

log = logging.getLogger("execbox.packages")

#: where a sandbox sees its request's package layer
PACKAGES_MOUNT = "/opt/packages"
MAX_REQUIREMENTS = 32
#: written by ``execbox build`` in every runtime environment (environments.py): part of a layer's key
_BUILD_STAMP = ".execbox-build.json"
#: a set refused or failed is answered the same way this long without running an installer
#: again (a burst of requests for a package that does not exist costs one pip run)
FAILURE_MEMORY_S = 30.0


# -- requirements -------------------------------------------------------------------------


def parse_requirements(language: Language, items: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """The canonical, sorted, de-duplicated requirements; BadRequestError naming a bad one."""
    if len(items) > MAX_REQUIREMENTS:
        raise BadRequestError(f"{len(items)} packages requested; at most {MAX_REQUIREMENTS} per request")
    grammar = get_runtime(language).packages
    canonical: dict[str, str] = {}
    for item in items:
        text = item.strip() if isinstance(item, str) else ""
        if (match := grammar.pattern.fullmatch(text)) is None:
            raise BadRequestError(f"package {item!r} is not {grammar.form}; URLs, paths and options are refused")
        name, requirement = grammar.canonical(match)
        if canonical.get(name, requirement) != requirement:
            raise BadRequestError(f"package {name} is named twice, with different versions")
        canonical[name] = requirement
    return tuple(sorted(canonical.values()))


def requirement_name(language: Language, requirement: str) -> str:
    """The package name of a canonical requirement (lower case, for the allowlist)."""
    return get_runtime(language).packages.name_of(requirement)


def _allowed(allowed: frozenset[str], language: Language, name: str) -> bool:
    scopes = tuple(f"{runtime.name}:" for runtime in RUNTIMES.values())
    normalise = get_runtime(language).packages.normalise
    for entry in allowed:
        scope, _, listed = entry.rpartition(":") if entry.startswith(scopes) else ("", "", entry)
        if scope and scope != language.value:
            continue
        if normalise(listed) == name:
            return True
    return False


def layer_key(language: Language, requirements: tuple[str, ...], runtime_stamp: str) -> str:
    """The content address of a layer: language, requirements and the runtime's build."""
    data = json.dumps({"language": language.value, "requirements": list(requirements), "runtime": runtime_stamp})
    return hashlib.sha256(data.encode()).hexdigest()[:32]


# -- the layer in a sandbox -----------------------------------------------------------------


def package_spec(spec: SandboxSpec, layer: Path) -> SandboxSpec:
    """``spec`` with ``layer`` mounted read-only at PACKAGES_MOUNT and on the import path."""
    grammar = spec.runtime.packages
    env = grammar.layer_env(dict(spec.env), PACKAGES_MOUNT)
    runtime = dataclasses.replace(spec.runtime, argv_template=grammar.layer_argv(spec.runtime.argv_template))
    mounts = (*spec.mounts, Mount(layer, PACKAGES_MOUNT))
    return dataclasses.replace(spec, runtime=runtime, env=env, mounts=mounts, dedicated=True)


def packages_backend(backend: IsolationBackend, settings: Settings) -> IsolationBackend:
    """The backend that builds package sandboxes: for namespaces with a fork server, the same
    backend with the bwrap launcher (see the module docstring); else ``backend`` itself."""
    if backend.name == "namespaces" and backend.describe().get("launcher") == "fork server":
        return build_backend("namespaces", settings.model_copy(update={"forkserver": False}))
    return backend


class LayerLease:
    """A layer in use (its lock held shared, so it is never evicted); ``release`` once."""

    def __init__(self, path: Path | None, fd: int | None, on_release: Callable[[], None] | None = None) -> None:
        #: the layer's directory; None when there is nothing to mount
        self.path = path
        self._fd = fd
        self._on_release = on_release

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
            if self._on_release is not None:
                self._on_release()


class LayeredSandbox(Sandbox):
    """A sandbox with a package layer: destroying it also lets go of the layer."""

    def __init__(self, inner: Sandbox, lease: LayerLease) -> None:
        super().__init__(inner.spec, inner.id)
        self.inner = inner
        self.lease = lease
        self.backend_name = inner.backend_name  # type: ignore[misc]

    @property
    def egress_key(self) -> str | None:
        return self.inner.egress_key

    def run(self, request: ExecutionRequest, limits: Limits, on_output: OutputSink | None = None) -> RunOutcome:
        return self.inner.run(request, limits, on_output)

    def run_cell(
        self, request: ExecutionRequest, limits: Limits, timeout_s: float, on_output: OutputSink | None = None
    ) -> RunOutcome:
        return self.inner.run_cell(request, limits, timeout_s, on_output)

    def open_workspace(self) -> int:
        return self.inner.open_workspace()

    def alive(self) -> bool:
        return self.inner.alive()

    def abort(self) -> None:
        self.inner.abort()

    def destroy(self) -> None:
        try:
            self.inner.destroy()
        finally:
            self.lease.release()


# -- the cache -----------------------------------------------------------------------------


class PackageCache:
    """The layers on disk, their locks and LRU; see the module docstring."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.root = settings.state_dir / "packages"
        self.allowed = settings.packages_allowed
        self._threads = ThreadPoolExecutor(max_workers=2, thread_name_prefix="execbox-packages")
        self._building: dict[str, asyncio.Lock] = {}
        self._over_cap = False
        self._evicting = threading.Lock()
        self._problems: dict[str, str] = {}
        self._failed: dict[str, tuple[float, ExecboxError]] = {}
        self.counts = {"hits": 0, "installs": 0, "refused": 0, "failures": 0, "evictions": 0}

    @property
    def enabled(self) -> bool:
        return self.allowed != frozenset()

    def start(self) -> list[str]:
        """Make the cache directory, remove what a crash left; warnings (a missing installer)."""
        if not self.enabled:
            return []
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)  # sandbox uids and the installer traverse it
        for path in list(self.root.iterdir()):
            # a crashed build's directory or record, or a layer without its record
            key = path.name.removeprefix(".build-").removeprefix(".")[:32]
            leftover = path.name.startswith(".") or (path.name == key and not (self.root / f"{key}.json").exists())
            if not leftover or (fd := self._lock(key, fcntl.LOCK_EX | fcntl.LOCK_NB)) is None:
                continue  # a layer, a record, a lock, or a build under way
            remove_tree(path)
            os.close(fd)
        installers = installer_problems()
        self._problems = {runtime.name: installers[runtime.packages.installer] for runtime in RUNTIMES.values()
                          if runtime.packages.installer in installers}  # fmt: skip
        return [f"SANDBOX_PACKAGES is set but {language} packages cannot be installed: {why}"
                for language, why in self._problems.items()]  # fmt: skip

    def close(self) -> None:
        self._threads.shutdown(wait=True)

    def stats(self) -> dict[str, int]:
        layers = [self._record(p.stem) for p in self.root.glob("*.json")] if self.root.is_dir() else []
        sizes = [r.get("size_bytes", 0) for r in layers if r]
        return {**self.counts, "layers": len(sizes), "size_bytes": sum(sizes)}

    def check(self, language: Language, items: tuple[str, ...] | list[str]) -> tuple[str, ...]:
        """The canonical requirements, if valid and allowed (BadRequestError otherwise)."""
        if not items:
            return ()
        if not self.enabled:
            raise BadRequestError("packages per request are off on this server (SANDBOX_PACKAGES=off)")
        requirements = parse_requirements(language, items)
        if self.allowed is not None:
            names = [requirement_name(language, r) for r in requirements]
            refused = [n for n in names if not _allowed(self.allowed, language, n)]
            if refused:
                raise BadRequestError(f"packages not allowed on this server (SANDBOX_PACKAGES): {', '.join(refused)}")
        return requirements

    async def acquire(self, language: Language, requirements: tuple[str, ...], runtime_env_dir: Path) -> LayerLease:
        """The layer of ``requirements``, built if needed, held until the lease is released."""
        if language.value in self._problems:
            raise PackageInstallError(f"{language.value} packages cannot be installed here: {self._problems[language.value]}")
        try:
            stamp = (runtime_env_dir / _BUILD_STAMP).read_text()
        except OSError:
            stamp = str(runtime_env_dir)
        key = layer_key(language, requirements, stamp)
        if (lease := self._hit(key, blocking=False)) is not None:
            self.counts["hits"] += 1
            return lease
        building = self._building.setdefault(key, asyncio.Lock())
        async with building:  # one build per key in this process (flock serialises processes)
            if (failed := self._failed.get(key)) is not None and time.monotonic() - failed[0] < FAILURE_MEMORY_S:
                raise type(failed[1])(str(failed[1]))
            work = asyncio.get_running_loop().run_in_executor(
                self._threads, self._get_or_build, key, language, requirements, runtime_env_dir
            )
            try:
                lease, built = await asyncio.shield(work)
            except asyncio.CancelledError:  # the caller went away: the layer stays cached
                work.add_done_callback(lambda f: f.exception() is None and f.result()[0].release())
                raise
            except (BadRequestError, PackageInstallError) as exc:
                self._failed = {k: v for k, v in self._failed.items() if time.monotonic() - v[0] < FAILURE_MEMORY_S}
                self._failed[key] = (time.monotonic(), exc)
                raise
        if not building.locked():
            self._building.pop(key, None)
        self.counts["installs" if built else "hits"] += 1
        return lease

    # -- internals (blocking) -----------------------------------------------------------

    def _lock(self, key: str, mode: int) -> int | None:
        """The key's lock file, locked in ``mode``; None if LOCK_NB and it is taken. A lock
        file removed (with its layer) while this waited is opened again."""
        path = self.root / f"{key}.lock"
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, mode)
            except BlockingIOError:
                os.close(fd)
                return None
            try:
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)

    def _record(self, key: str) -> dict[str, Any] | None:
        try:
            record: dict[str, Any] = json.loads((self.root / f"{key}.json").read_text())
            return record
        except (OSError, ValueError):
            return None

    def _built(self, key: str) -> dict[str, Any] | None:
        """The record of a layer that is built (an empty one, or one whose directory exists)."""
        record = self._record(key)
        return record if record is not None and (record.get("empty") or (self.root / key).is_dir()) else None

    def _hit(self, key: str, blocking: bool) -> LayerLease | None:
        """A lease of the layer if it is built, else None."""
        if not (self.root / f"{key}.json").exists():
            return None
        fd = self._lock(key, fcntl.LOCK_SH | (0 if blocking else fcntl.LOCK_NB))
        if fd is None:
            return None
        if (record := self._built(key)) is None:
            os.close(fd)
            return None
        with contextlib.suppress(OSError):
            os.utime(self.root / f"{key}.json")  # the last use, for the LRU
        if record.get("empty"):
            os.close(fd)
            return LayerLease(None, None)
        return LayerLease(self.root / key, fd, self._released)

    def _released(self) -> None:
        if self._over_cap:
            with contextlib.suppress(RuntimeError):  # the cache is closing
                self._threads.submit(self._evict, None)

    def _get_or_build(
        self, key: str, language: Language, requirements: tuple[str, ...], env_dir: Path
    ) -> tuple[LayerLease, bool]:
        """A lease of the layer, and whether this call built it."""
        built = False
        for _ in range(3):
            if (lease := self._hit(key, blocking=True)) is not None:
                return lease, built
            fd = self._lock(key, fcntl.LOCK_EX)
            assert fd is not None
            try:
                if self._built(key) is not None:
                    continue  # another process built it meanwhile
                self._build(key, language, requirements, env_dir)
                built = True
            except BaseException:  # nothing of a refused or failed set stays (its waiters retry)
                (self.root / f"{key}.lock").unlink(missing_ok=True)
                raise
            finally:
                os.close(fd)
            self._evict(protect=key)
        raise PackageInstallError("the package layer was evicted as soon as it was built: raise SANDBOX_PACKAGES_CACHE_SIZE")

    def _build(self, key: str, language: Language, requirements: tuple[str, ...], env_dir: Path) -> None:
        started = time.monotonic()
        remove_tree(self.root / key)  # a layer left without its record
        staging = Path(tempfile.mkdtemp(prefix=f".build-{key}-", dir=self.root))
        try:
            layer, work = staging / "layer", staging / "work"
            for path in (staging, layer, work, work / "home"):
                path.mkdir(exist_ok=True)
                if os.geteuid() == 0:
                    os.chown(path, INSTALLER_UID, INSTALLER_UID)
            timeout_s = self.settings.packages_install_timeout
            try:
                install = INSTALLERS[get_runtime(language).packages.installer]
                installed = install(layer, work, requirements, env_dir, timeout_s)
                size = seal_layer(layer) if installed else 0
                if size > self.settings.packages_cache_size:
                    raise BadRequestError(
                        f"the packages take {size >> 20} MiB, more than the whole package cache "
                        f"(SANDBOX_PACKAGES_CACHE_SIZE={self.settings.packages_cache_size >> 20} MiB)"
                    )
            except BadRequestError:
                self.counts["refused"] += 1
                raise
            except PackageInstallError:
                self.counts["failures"] += 1
                raise
            if installed:
                os.chmod(layer, 0o555)
                os.rename(layer, self.root / key)
            record = {
                "language": language.value, "requirements": list(requirements), "installed": installed,
                "size_bytes": size, "empty": not installed, "built_at": time.time(),
            }  # fmt: skip
            partial = self.root / f".{key}.json.tmp"
            partial.write_text(json.dumps(record, indent=1))
            os.rename(partial, self.root / f"{key}.json")  # the layer exists from here on
            log.info("package layer %s built in %.1fs: %s (%d KiB)", key, time.monotonic() - started,
                     " ".join(installed) or "nothing beyond the runtime", size >> 10)  # fmt: skip
        finally:
            remove_tree(staging)

    def _evict(self, protect: str | None) -> None:
        """Remove the least recently used layers nobody holds until the cache fits its size."""
        with self._evicting:  # one at a time: each sees what the last one left
            self._evict_locked(protect)

    def _evict_locked(self, protect: str | None) -> None:
        entries = []
        for path in self.root.glob("*.json"):
            with contextlib.suppress(OSError):
                entries.append((path.stat().st_mtime, path.stem, (self._record(path.stem) or {}).get("size_bytes", 0)))
        total = sum(size for _, _, size in entries)
        for _, key, size in sorted(entries):
            if total <= self.settings.packages_cache_size:
                break
            if key == protect:
                continue
            fd = self._lock(key, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if fd is None:  # in use
                continue
            try:
                (self.root / f"{key}.json").unlink(missing_ok=True)
                remove_tree(self.root / key)
                (self.root / f"{key}.lock").unlink(missing_ok=True)
            finally:
                os.close(fd)
            total -= size
            self.counts["evictions"] += 1
            log.info("package layer %s evicted (%d KiB)", key, size >> 10)
        self._over_cap = total > self.settings.packages_cache_size
