"""The ``gvisor`` backend: gVisor (runsc) as the outer wall.

Two modes, chosen by probing the runsc at hand (never its version string):

* **two walls** (a runsc whose sandboxes offer working mount namespaces, e.g. Debian 12's
  bookworm-backports ``0.0~20240729``): each warm pool slot is a long-lived gVisor sandbox
  with the fork server inside, and every execution runs in a fresh inner sandbox built by
  the same code as the ``namespaces`` backend's; see :mod:`execbox.isolation.gvisor_host`.
* **single-use** (an older runsc, ``SANDBOX_GVISOR_EXECUTIONS_PER_SANDBOX=1``, or
  ``SANDBOX_ENABLE_SECCOMP``, whose Docker-format profile applies to the whole sandbox):
  one gVisor sandbox per execution, as described below.

The platform is ``ptrace`` where a real sandbox starts on it, else ``systrap`` (see
``_AUTO_PLATFORMS`` for why); ``kvm`` only when asked for and only if a real sandbox starts
on it within seconds.

Single-use: each sandbox is an OCI bundle (:mod:`execbox.isolation.oci`) run by an attached
``runsc run`` under a runsc state root of execbox's own (``<state_dir>/gvisor/state``),
always with ``--network=none``: a read-only root of read-only binds (``/usr``, a minimal
``/etc``, the runtime environment, the driver), gVisor-internal size-capped tmpfs ``/tmp``
and ``/dev/shm``, uid/gid 65534, no capabilities, no_new_privs, rlimits (core 0, file
size, open files, processes), a host cgroup with memory, CPU and a high pids backstop.
The user's code talks only to the gVisor sentry, never to the host kernel.

* Channels: one socket, given as the container's stdin (this runsc passes no other
  fds) and split into fds 3 and 4 inside; see :mod:`execbox.isolation.oci`.
* Workspace: a size-capped tmpfs mounted on the host per sandbox at
  ``<state_dir>/gvisor/work/<id>``, bind-mounted read-write at ``/workspace``; the host
  reads ``artifacts/`` through a plain directory fd of it. Unmounted at destroy.
* OOM: execbox creates the memory/pids/cpu cgroups itself
  (``/execbox-gvisor-<hash of state_dir>/<id>``, given as ``linux.cgroupsPath``; runsc
  uses pre-created cgroups and removes only those it created), so their counters
  outlive the sandbox. Over the limit, the host kernel SIGKILLs the sentry and runsc
  exits 137; ``oom_killed`` relies only on the cgroup's ``oom_kill`` counter
  (``memory.oom_control`` v1, ``memory.events`` v2). The limit is the execution's
  memory plus :data:`SENTRY_MEMORY_BYTES` for gVisor itself; the peak includes it.
* Teardown: SIGKILL the sentry through a pidfd; the attached ``runsc run`` then deletes
  the container's state and the cgroups runsc created; execbox removes its cgroup, the
  workspace mount and the bundle. If the service dies, the driver sees its channel
  close and exits, which ends the sandbox; ``reap()`` removes the rest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from execbox.errors import BackendUnavailableError, SandboxError, SandboxStartError
from execbox.isolation.base import IsolationBackend, Sandbox, SandboxSpec
from execbox.isolation.cgroups import CgroupManager
from execbox.isolation.gvisor_host import SENTRY_MEMORY_BYTES, GVisorExecution, GVisorHost, HostLayout
from execbox.isolation.gvisor_single import GVisorSandbox, start_single_use
from execbox.isolation.hostproc import (
    remove_workspace,
)
from execbox.isolation.oci import (
    SeccompProfileError,
    docker_profile_to_oci,
    load_docker_profile,
    make_mount_points,
    prepare_rootfs,
    probe_config,
)
from execbox.isolation.owners import is_orphan, sandbox_name
from execbox.isolation.rootfs import PlanStep, mount_plan, publish_etc, system_steps
from execbox.isolation.seccomp import filter_bpf

__all__ = ["PIDS_BACKSTOP", "SENTRY_MEMORY_BYTES", "GVisorBackend", "GVisorSandbox"]

log = logging.getLogger("execbox.gvisor")

#: a long-lived gVisor sandbox no execution took for this long is closed
IDLE_HOST_S = 5.0
#: how long a request for a sandbox waits for a gVisor sandbox that is being cleaned up
_FINISHING_WAIT_S = 2.0
_IDLE_CHECK_S = 1.0
#: pids cgroup backstop only: gVisor counts its own threads and breaks below ~256
PIDS_BACKSTOP = 1024
_CGROUP_PARENT = "execbox-gvisor"
#: platforms tried, in order, when none is configured. ptrace first: measured on the 2-core
#: VM execbox is developed on (bench/run.py, runsc 20240729), an idle systrap sandbox burns
#: ~55 ms of CPU a second (ptrace: ~1-3 ms) and preparing an inner sandbox costs ~170-300 ms
#: of CPU on systrap against ~110-160 ms on ptrace; SANDBOX_GVISOR_PLATFORM=systrap chooses it
_AUTO_PLATFORMS = ("ptrace", "systrap")
#: a kvm (or any) probe sandbox must start within this
_PROBE_TIMEOUT_S = 20.0
#: inside a probe sandbox: does a child's private mount namespace hide its tmpfs?
_INNER_PROBE = (
    "import ctypes,os\n"
    "c=ctypes.CDLL(None,use_errno=True)\n"
    "pid=os.fork()\n"
    "if pid==0:\n"
    " ok=c.unshare(0x20000|0x20000000|0x8000000|0x4000000)==0 and c.mount(None,b'/',None,(1<<14)|(1<<18),None)==0"
    " and c.mount(b'tmpfs',b'/tmp',b'tmpfs',0,b'size=1m')==0\n"
    " open('/tmp/probe','w').close() if ok else None\n"
    " os._exit(0 if ok else 3)\n"
    "st=os.waitpid(pid,0)[1]\n"
    "print('inner-isolated' if st==0 and not os.path.exists('/tmp/probe') else 'inner-shared')\n"
)


class GVisorBackend(IsolationBackend):
    """Builds gVisor sandboxes; see the module docstring for the two modes."""

    name = "gvisor"

    def __init__(
        self,
        state_dir: Path,
        uid: int = 65534,
        seccomp_profile: Path | None = None,
        runsc: str = "/usr/bin/runsc",
        *,
        platform: str = "auto",
        cgroups: CgroupManager | None = None,
        executions_per_sandbox: int = 100,
        sandbox_lifetime_s: float = 600.0,
        uid_base: int = 60001,
        uid_count: int = 1000,
    ) -> None:
        self._dir = state_dir / "gvisor"
        self._root = self._dir / "state"
        self._bundles = self._dir / "bundles"
        self._work = self._dir / "work"
        self._uid = uid
        self._seccomp_profile = seccomp_profile
        self._runsc_path = runsc
        self._platform_choice = platform
        self._platform = platform if platform != "auto" else _AUTO_PLATFORMS[0]
        self._executions_max = executions_per_sandbox
        self._lifetime_s = sandbox_lifetime_s
        self._uid_range = (uid_base, uid_count)
        #: "two-walls" or "single-use", decided by check()
        self.mode = "single-use" if executions_per_sandbox <= 1 or seccomp_profile else "two-walls"
        self._mode_reason = ""
        self._version = ""
        # one cgroup parent per state directory: reap() never touches another instance's sandboxes
        digest = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:8]
        self._cgroups = cgroups or CgroupManager(parent=f"{_CGROUP_PARENT}-{digest}")
        self._seccomp: dict[Path, dict[str, Any]] = {}
        self._layout: tuple[Path, Path] | None = None
        self._free: dict[int, list[GVisorHost]] = {}
        self._hosts: set[GVisorHost] = set()
        self._idle_timer: threading.Timer | None = None
        self._finishing: dict[int, int] = {}
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)

    def _argv(self, *args: str) -> list[str]:
        return [self._runsc_path, "--root", str(self._root), "--network=none", f"--platform={self._platform}", *args]

    def _run_runsc(self, *args: str, timeout_s: float = 30) -> subprocess.CompletedProcess[bytes]:
        try:
            return subprocess.run(self._argv(*args), capture_output=True, timeout=timeout_s, check=False, env={})
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise SandboxError(f"runsc {' '.join(args)} failed: {exc}") from exc

    def describe(self) -> dict[str, Any]:
        return {
            "runsc_version": self._version,
            "platform": self._platform,
            "mode": self.mode,
            "mode_reason": self._mode_reason,
            "executions_per_sandbox": self._executions_max if self.mode == "two-walls" else 1,
            "sandbox_lifetime_s": self._lifetime_s,
        }

    # -- host checks -----------------------------------------------------------------

    def check(self) -> None:
        if not os.access(self._runsc_path, os.X_OK):
            raise BackendUnavailableError(
                f"runsc (gVisor) is not installed at {self._runsc_path}: on Debian 12 `make setup` installs it "
                "from bookworm-backports; elsewhere see https://gvisor.dev/docs/user_guide/install/"
            )
        if os.geteuid() != 0:
            raise BackendUnavailableError("the gvisor backend needs root (runsc sandboxes, cgroups, workspace mounts)")
        self._cgroups.check()
        try:
            version = subprocess.run([self._runsc_path, "--version"], capture_output=True, timeout=10, check=False)
            offered = subprocess.run([self._runsc_path, "help", "platforms"], capture_output=True, timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise BackendUnavailableError(f"runsc does not answer: {exc}") from exc
        self._version = version.stdout.decode(errors="replace").splitlines()[0].removeprefix("runsc version ") if version.stdout else "unknown"
        platforms = offered.stdout.decode(errors="replace").split()
        wanted = _AUTO_PLATFORMS if self._platform_choice == "auto" else (self._platform_choice,)
        seccomp = self._seccomp_section(self._seccomp_profile)
        failures = []
        for platform in wanted:
            if platform not in platforms:
                failures.append(f"{platform}: not offered by this runsc (it offers {', '.join(platforms)})")
                continue
            self._platform = platform
            try:
                done = self._probe(seccomp)
            except BackendUnavailableError as exc:
                failures.append(f"{platform}: {exc}")
                continue
            said = (done.stderr or done.stdout).decode(errors="replace").strip()[-400:]
            if seccomp is None and done.returncode == 0 and b"Linux" in done.stdout:
                break
            if seccomp is not None and b"Linux" in done.stdout:
                raise BackendUnavailableError(
                    "SANDBOX_ENABLE_SECCOMP is set but this runsc ignores OCI seccomp profiles; "
                    "upgrade gVisor or unset SANDBOX_ENABLE_SECCOMP"
                )
            if seccomp is not None and b"not permitted" in done.stderr:
                break
            failures.append(f"{platform}: exit {done.returncode}: {said}")
        else:
            raise BackendUnavailableError(
                "runsc cannot start a sandbox (" + "; ".join(failures) + "); see "
                f"`runsc --network=none --platform={wanted[0]} do true`"
            )
        self._choose_mode()

    def _choose_mode(self) -> None:
        """Two walls where inner mount namespaces really isolate; single-use otherwise."""
        if self._seccomp_profile is not None:
            self.mode, self._mode_reason = "single-use", "SANDBOX_ENABLE_SECCOMP applies a profile to the whole sandbox"
        elif self._executions_max <= 1:
            self.mode, self._mode_reason = "single-use", "SANDBOX_GVISOR_EXECUTIONS_PER_SANDBOX=1"
        else:
            done = self._probe(None, inner=True)
            if b"inner-isolated" in done.stdout:
                self.mode, self._mode_reason = "two-walls", "mount namespaces work inside this runsc"
            else:
                self.mode = "single-use"
                self._mode_reason = (
                    f"this runsc ({self._version}) has no working mount namespaces inside its sandboxes; "
                    "install a current gVisor (Debian 12: runsc from bookworm-backports) for two walls"
                )
                log.warning("gvisor backend runs single-use sandboxes: %s", self._mode_reason)

    def _probe(self, seccomp: dict[str, Any] | None, inner: bool = False) -> subprocess.CompletedProcess[bytes]:
        """Run the tiny ``uname`` sandbox of :func:`probe_config` for real (``inner``: the
        mount-namespace probe, as root inside gVisor)."""
        rootfs, _ = self._layout_paths()
        plan = [*system_steps(), *([PlanStep.tmpfs("/tmp", 1 << 20)] if inner else [])]
        make_mount_points(rootfs, plan)
        probe = sandbox_name("probe")
        bundle = self._bundles / probe
        bundle.mkdir()
        try:
            config = probe_config(rootfs, self._uid, seccomp, plan)
            if inner:
                config["process"].update(
                    user={"uid": 0, "gid": 0}, args=["/usr/bin/python3", "-I", "-c", _INNER_PROBE],
                    capabilities={k: ["CAP_SYS_ADMIN"] for k in ("bounding", "effective", "permitted")},
                )  # fmt: skip
            (bundle / "config.json").write_text(json.dumps(config))
            argv = self._argv(*_seccomp_flags(seccomp), "run", "--bundle", str(bundle), probe)
            return subprocess.run(
                argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=_PROBE_TIMEOUT_S, check=False, env={}
            )
        except subprocess.TimeoutExpired as exc:
            self._run_runsc("kill", probe, "KILL", timeout_s=10)
            raise BackendUnavailableError(
                f"runsc did not run a tiny sandbox within {_PROBE_TIMEOUT_S:g} s on platform {self._platform}; "
                f"try `runsc --network=none --platform={self._platform} do true`"
            ) from exc
        finally:
            self._delete_state(probe)
            shutil.rmtree(bundle, ignore_errors=True)

    def _seccomp_section(self, profile: Path | None) -> dict[str, Any] | None:
        """The OCI seccomp section of ``profile`` (cached); raises when runsc cannot apply it."""
        if profile is None:
            return None
        with self._lock:
            if profile in self._seccomp:
                return self._seccomp[profile]
        try:
            flags = subprocess.run([self._runsc_path, "flags"], capture_output=True, timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise BackendUnavailableError(f"runsc flags does not answer: {exc}") from exc
        if b"oci-seccomp" not in flags.stdout + flags.stderr:
            raise BackendUnavailableError(
                "SANDBOX_ENABLE_SECCOMP is set but this runsc cannot apply OCI seccomp profiles "
                "(no --oci-seccomp flag); upgrade gVisor or unset SANDBOX_ENABLE_SECCOMP"
            )
        try:
            section, notes = docker_profile_to_oci(load_docker_profile(profile))
        except SeccompProfileError as exc:
            raise SeccompProfileError(f"SANDBOX_ENABLE_SECCOMP: {profile}: {exc}") from exc
        for note in notes:
            log.info("seccomp profile %s: %s", profile.name, note)
        with self._lock:
            self._seccomp[profile] = section
        return section

    def _layout_paths(self) -> tuple[Path, Path]:
        """The shared read-only root skeleton and the minimal /etc (built once per instance,
        in place and idempotently: sandboxes of another instance may be using them)."""
        with self._lock:
            if self._layout is None:
                for path in (self._root, self._bundles, self._work):
                    path.mkdir(parents=True, exist_ok=True)
                    path.chmod(0o700)  # workspaces belong to uid 65534 on the host: keep host users out
                self._layout = (prepare_rootfs(self._dir), publish_etc(self._dir, *self._uid_range))
            return self._layout

    # -- sandboxes -------------------------------------------------------------------

    def preloads(self, spec: SandboxSpec) -> bool:
        """Two walls: the fork server inside each long-lived gVisor sandbox imports them."""
        return self.mode == "two-walls" and not spec.dedicated and spec.forks_preloaded

    def create(self, spec: SandboxSpec) -> Sandbox:
        if not spec.runtime_env_dir.is_dir():
            raise SandboxStartError(
                f"the {spec.runtime.name} runtime environment {spec.runtime_env_dir} is missing; run `execbox build`"
            )
        if self.mode == "two-walls" and not spec.dedicated:  # a session's sandbox has a gVisor sandbox of its own
            return self._create_inner(spec)
        return self._create_single(spec)

    # -- two walls --------------------------------------------------------------------

    def _host_layout(self) -> HostLayout:
        rootfs, _ = self._layout_paths()
        return HostLayout(
            runsc_argv=self._argv, delete_state=self._delete_state, bundles=self._bundles, work=self._work,
            rootfs=rootfs, cgroups=self._cgroups, uid_base=self._uid_range[0], uid_count=self._uid_range[1],
            pids_backstop=PIDS_BACKSTOP, sentry_memory_bytes=SENTRY_MEMORY_BYTES,
        )  # fmt: skip

    def _create_inner(self, spec: SandboxSpec) -> Sandbox:
        """A fresh inner sandbox in a free long-lived gVisor sandbox (started if none is free)."""
        host, stale = None, []
        with self._lock:
            free = self._free.setdefault(id(spec), [])
            # an execution of this spec that just ended gives its host back within moments:
            # wait for it rather than start another gVisor sandbox (seconds of CPU)
            self._changed.wait_for(lambda: free or not self._finishing.get(id(spec)), _FINISHING_WAIT_S)
            while free and host is None:
                candidate = free.pop()
                if candidate.usable(self._executions_max, self._lifetime_s):
                    host = candidate
                else:
                    stale.append(candidate)
                    self._hosts.discard(candidate)
        for candidate in stale:
            candidate.close()
        if host is None:
            _, etc = self._layout_paths()
            host = GVisorHost(self._host_layout(), spec, mount_plan(spec, etc), filter_bpf(spec.egress is not None))
            host.start()
            with self._lock:
                self._hosts.add(host)
        try:
            execution = host.prepare()
        except BaseException:
            with self._lock:
                self._hosts.discard(host)
            host.close()
            raise
        execution.on_run_done = self._finishing_one
        execution.on_destroyed = self._returned
        return execution

    def _finishing_one(self, execution: GVisorExecution) -> None:
        """An execution's run is over: its host comes back once it is destroyed."""
        with self._lock:
            key = id(execution.host.spec)
            self._finishing[key] = self._finishing.get(key, 0) + 1

    def _returned(self, execution: GVisorExecution) -> None:
        """An execution was destroyed: its host serves the next one, or is retired."""
        host = execution.host
        with self._lock:
            if execution.run_done:
                self._finishing[id(host.spec)] -= 1
            self._changed.notify_all()
            if host.usable(self._executions_max, self._lifetime_s) and host in self._hosts:
                host.idle_since = time.monotonic()
                self._free.setdefault(id(host.spec), []).append(host)
                if self._idle_timer is None:
                    self._idle_timer = threading.Timer(_IDLE_CHECK_S, self._close_idle)
                    self._idle_timer.daemon = True
                    self._idle_timer.start()
                return
            self._hosts.discard(host)
        host.close()

    def _close_idle(self) -> None:
        """Close hosts nobody took for a while (the pool keeps only its warm ones busy)."""
        now = time.monotonic()
        idle: list[GVisorHost] = []
        with self._lock:
            self._idle_timer = None
            for free in self._free.values():
                idle += [h for h in free if now - h.idle_since >= IDLE_HOST_S]
                free[:] = [h for h in free if now - h.idle_since < IDLE_HOST_S]
            self._hosts.difference_update(idle)
            if any(self._free.values()):
                self._idle_timer = threading.Timer(_IDLE_CHECK_S, self._close_idle)
                self._idle_timer.daemon = True
                self._idle_timer.start()
        for host in idle:
            try:
                host.close()
            except Exception:  # never leave the others open
                log.exception("closing the idle gVisor sandbox %s failed", host.id)

    # -- single use -------------------------------------------------------------------

    def _create_single(self, spec: SandboxSpec) -> Sandbox:
        seccomp = self._seccomp_section(spec.seccomp_profile or self._seccomp_profile)
        _, etc = self._layout_paths()
        plan = mount_plan(spec, etc)
        layout = self._host_layout()
        return start_single_use(layout, spec, plan, uid=self._uid, seccomp=seccomp, runsc_flags=_seccomp_flags(seccomp))

    def _delete_state(self, sandbox_id: str) -> None:
        """``runsc delete --force`` when runsc left state for ``sandbox_id`` (the attached
        ``runsc run`` normally deletes it; its files are named ``<id>_sandbox:<id>.*``)."""
        if any(self._root.glob(f"{sandbox_id}_*")):
            self._run_runsc("delete", "--force", sandbox_id)
        # runsc can leave the empty lock file of a container whose state it already removed
        # (a `runsc run` ended under load): nothing uses it once the container is gone
        if not any(p.suffix != ".lock" for p in self._root.glob(f"{sandbox_id}_*")):
            for lock in self._root.glob(f"{sandbox_id}_*.lock"):
                lock.unlink(missing_ok=True)

    def reap(self) -> int:
        """Remove what a crashed service left: runsc containers, workspace mounts, bundles and
        cgroups of this state directory; returns how many sandboxes were found."""
        found: set[str] = set()
        if self._root.is_dir() and os.access(self._runsc_path, os.X_OK):
            for sandbox_id in self._run_runsc("list", "--quiet").stdout.decode().split():
                if not is_orphan(sandbox_id):
                    continue
                self._run_runsc("kill", sandbox_id, "KILL")
                self._run_runsc("delete", "--force", sandbox_id)
                found.add(sandbox_id)
        for directory in (self._work, self._bundles):
            if directory.is_dir():
                for entry in directory.iterdir():
                    if not is_orphan(entry.name):
                        continue
                    if directory == self._work:
                        remove_workspace(entry)
                    shutil.rmtree(entry, ignore_errors=True)
                    found.add(entry.name)
        found.update(_reap_cgroups(self._cgroups.root, self._cgroups.parent))
        return len(found)

    def close(self) -> None:
        """Close every long-lived gVisor sandbox; remove this state directory's cgroup parents
        if no sandbox is left in them."""
        with self._lock:  # (the backend may be used again afterwards: nothing here forbids it)
            hosts, self._hosts, self._free = list(self._hosts), set(), {}
            if self._idle_timer is not None:
                self._idle_timer.cancel()
                self._idle_timer = None
        for host in hosts:
            host.close()
        for top in _cgroup_parents(self._cgroups.root, self._cgroups.parent):
            with contextlib.suppress(OSError):  # absent, or still in use
                top.rmdir()


# -- host helpers -------------------------------------------------------------------


def _seccomp_flags(seccomp: dict[str, Any] | None) -> list[str]:
    return ["--oci-seccomp"] if seccomp is not None else []


def _cgroup_parents(root: Path, parent: str) -> list[Path]:
    """``parent`` in the v2 root and in every v1 hierarchy (named or not)."""
    return [root / parent, *(h / parent for h in root.iterdir() if h.is_dir() and not h.is_symlink())]


def _reap_cgroups(root: Path, parent: str) -> set[str]:
    """Kill and remove every cgroup under ``parent`` in every hierarchy (runsc also creates
    some in hierarchies execbox does not use: blkio, cpuset, devices...)."""
    names: set[str] = set()
    tops = _cgroup_parents(root, parent)
    for group in (g for top in tops if top.is_dir() for g in top.iterdir() if g.is_dir() and is_orphan(g.name)):
        names.add(group.name)
        for _ in range(250):
            with contextlib.suppress(OSError):
                for pid in (group / "cgroup.procs").read_text().split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
            try:
                group.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.02)
    return names
