"""The ``gvisor`` backend: one gVisor (runsc, ptrace platform) sandbox per execution.

Each sandbox is an OCI bundle (:mod:`execbox.isolation.oci`) run by an attached
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
import ctypes
import errno
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from execbox.errors import BackendUnavailableError, SandboxError, SandboxStartError
from execbox.isolation.base import IsolationBackend, Sandbox, SandboxSpec
from execbox.isolation.cgroups import Cgroup, CgroupManager
from execbox.isolation.hostproc import (
    close_all,
    kill_pidfd,
    kill_process,
    read_available,
)
from execbox.isolation.oci import (
    SeccompProfileError,
    SystemBind,
    build_config,
    docker_profile_to_oci,
    load_docker_profile,
    make_mount_points,
    prepare_rootfs,
    probe_config,
)
from execbox.isolation.owners import is_orphan, sandbox_name
from execbox.isolation.protocol import FrameReader
from execbox.isolation.supervise import SupervisedSandbox, wait_ready

__all__ = ["PIDS_BACKSTOP", "SENTRY_MEMORY_BYTES", "GVisorBackend", "GVisorSandbox"]

log = logging.getLogger("execbox.gvisor")

#: memory allowed on top of the execution's limit for the sentry, gofer and ptrace stubs
SENTRY_MEMORY_BYTES = 32 << 20
#: pids cgroup backstop only: gVisor counts its own threads and breaks below ~256
PIDS_BACKSTOP = 1024
_CGROUP_PARENT = "execbox-gvisor"
_REFUSED_PLATFORMS = {"kvm": "the kvm platform hangs with the sandbox at 100% CPU with this gVisor; use ptrace"}
_MS_NOSUID, _MS_NODEV, _MNT_DETACH = 0x2, 0x4, 0x2
_libc = ctypes.CDLL(None, use_errno=True)


class GVisorSandbox(SupervisedSandbox):
    backend_name = "gvisor"

    def __init__(
        self,
        spec: SandboxSpec,
        sandbox_id: str,
        *,
        process: subprocess.Popen[bytes],
        sentry_pidfd: int,
        cgroup: Cgroup,
        fds: dict[str, int],
        reader: FrameReader,
        workspace_dir: Path,
        delete_state: Callable[[str], None],
        release: contextlib.ExitStack,
    ) -> None:
        super().__init__(spec, sandbox_id, cgroup=cgroup, fds=fds, reader=reader, release=release)
        self._process = process
        self._sentry_pidfd = sentry_pidfd
        self._workspace_dir = workspace_dir
        self._delete_state = delete_state

    def _kill(self) -> None:
        """SIGKILL the sentry: every process of the sandbox ends with it."""
        kill_pidfd(self._sentry_pidfd)

    def _running(self) -> bool:
        return self._process.poll() is None

    def _host_threads(self) -> list[int]:
        """The sentry's threads (in the cgroup) and those of runsc and its gofer (outside it)."""
        tids = set(self.cgroup.threads())
        pending = [self._process.pid]
        while pending:
            pid = pending.pop()
            with contextlib.suppress(OSError):
                for task in os.listdir(f"/proc/{pid}/task"):
                    tids.add(int(task))
                    with contextlib.suppress(OSError):
                        pending += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
        return sorted(tids)

    def _set_memory_limit(self, memory_bytes: int) -> None:
        self.cgroup.set_memory_limit(memory_bytes + SENTRY_MEMORY_BYTES)

    def _exit_status(self, timeout_s: float) -> tuple[int | None, int | None]:
        try:
            status = self._process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            raise TimeoutError(f"sandbox {self.id} still running") from exc
        # runsc exits with the driver's status, or 128 + the signal that ended it
        # (137 also when the sentry itself was SIGKILLed: OOM, or by us); < 0: runsc was killed
        if status > 128 or status < 0:
            return None, status - 128 if status > 128 else -status
        return status, None

    def open_workspace(self) -> int:
        """The host-side workspace tmpfs: the very files the sandbox sees at /workspace."""
        if self._destroyed or self._process.poll() is not None:
            raise SandboxError(f"sandbox {self.id} has ended; its workspace is gone")
        return os.open(self._workspace_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)

    def _teardown(self) -> None:
        self._kill()
        try:
            self._process.wait(timeout=10)  # runsc deletes the container's state and its cgroups
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(timeout=10)
        self._delete_state(self.id)


class GVisorBackend(IsolationBackend):
    """Builds gVisor sandboxes; see the module docstring for what each one gets."""

    name = "gvisor"

    def __init__(
        self,
        state_dir: Path,
        uid: int = 65534,
        seccomp_profile: Path | None = None,
        runsc: str = "/usr/bin/runsc",
        *,
        platform: str = "ptrace",
        cgroups: CgroupManager | None = None,
    ) -> None:
        self._dir = state_dir / "gvisor"
        self._root = self._dir / "state"
        self._bundles = self._dir / "bundles"
        self._work = self._dir / "work"
        self._uid = uid
        self._seccomp_profile = seccomp_profile
        self._runsc_path = runsc
        self._platform = platform
        # one cgroup parent per state directory: reap() never touches another instance's sandboxes
        digest = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:8]
        self._cgroups = cgroups or CgroupManager(parent=f"{_CGROUP_PARENT}-{digest}")
        self._seccomp: dict[Path, dict[str, Any]] = {}
        self._layout: tuple[Path, list[SystemBind]] | None = None
        self._lock = threading.Lock()

    def _argv(self, *args: str) -> list[str]:
        return [self._runsc_path, "--root", str(self._root), "--network=none", f"--platform={self._platform}", *args]

    def _run_runsc(self, *args: str, timeout_s: float = 30) -> subprocess.CompletedProcess[bytes]:
        try:
            return subprocess.run(self._argv(*args), capture_output=True, timeout=timeout_s, check=False, env={})
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise SandboxError(f"runsc {' '.join(args)} failed: {exc}") from exc

    # -- host checks -----------------------------------------------------------------

    def check(self) -> None:
        if not os.access(self._runsc_path, os.X_OK):
            raise BackendUnavailableError(
                f"runsc (gVisor) is not installed at {self._runsc_path}: apt-get install runsc "
                "(Debian/Ubuntu), or see https://gvisor.dev/docs/user_guide/install/"
            )
        if self._platform in _REFUSED_PLATFORMS:
            raise BackendUnavailableError(f"runsc platform {self._platform}: {_REFUSED_PLATFORMS[self._platform]}")
        if os.geteuid() != 0:
            raise BackendUnavailableError("the gvisor backend needs root (runsc sandboxes, cgroups, workspace mounts)")
        self._cgroups.check()
        offered = subprocess.run([self._runsc_path, "help", "platforms"], capture_output=True, check=False).stdout
        if self._platform not in offered.decode(errors="replace").split():
            raise BackendUnavailableError(
                f"this runsc has no platform {self._platform!r} (it offers {', '.join(offered.decode().split())}); "
                "use ptrace"
            )
        seccomp = self._seccomp_section(self._seccomp_profile)
        done = self._probe(seccomp)
        said = (done.stderr or done.stdout).decode(errors="replace").strip()[-400:]
        if seccomp is None:
            if done.returncode == 0 and b"Linux" in done.stdout:
                return
            raise BackendUnavailableError(
                f"runsc cannot start a sandbox (exit {done.returncode}: {said}); see "
                f"`runsc --network=none --platform={self._platform} do true`; reinstall with apt-get install runsc"
            )
        if b"Linux" in done.stdout:
            raise BackendUnavailableError(
                "SANDBOX_ENABLE_SECCOMP is set but this runsc ignores OCI seccomp profiles; "
                "upgrade gVisor or unset SANDBOX_ENABLE_SECCOMP"
            )
        if b"not permitted" not in done.stderr:
            raise BackendUnavailableError(
                f"SANDBOX_ENABLE_SECCOMP: runsc cannot apply {self._seccomp_profile} (exit {done.returncode}: "
                f"{said}); fix the profile or unset SANDBOX_ENABLE_SECCOMP"
            )

    def _probe(self, seccomp: dict[str, Any] | None) -> subprocess.CompletedProcess[bytes]:
        """Run the tiny ``uname`` sandbox of :func:`probe_config` for real."""
        rootfs, _ = self._layout_paths()
        probe = sandbox_name("probe")
        bundle = self._bundles / probe
        bundle.mkdir()
        try:
            (bundle / "config.json").write_text(json.dumps(probe_config(rootfs, self._uid, seccomp)))
            argv = self._argv(*_seccomp_flags(seccomp), "run", "--bundle", str(bundle), probe)
            return subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=60, check=False, env={})
        except subprocess.TimeoutExpired as exc:
            raise BackendUnavailableError(
                f"runsc did not run a tiny sandbox within 60 s on platform {self._platform}; "
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
        flags = subprocess.run([self._runsc_path, "flags"], capture_output=True, check=False)
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

    def _layout_paths(self) -> tuple[Path, list[SystemBind]]:
        """The shared read-only root skeleton and the system binds (built once per instance,
        in place and idempotently: sandboxes of another instance may be using them)."""
        with self._lock:
            if self._layout is None:
                for path in (self._root, self._bundles, self._work):
                    path.mkdir(parents=True, exist_ok=True)
                    path.chmod(0o700)  # workspaces belong to uid 65534 on the host: keep host users out
                self._layout = prepare_rootfs(self._dir, self._uid)
            return self._layout

    # -- sandboxes -------------------------------------------------------------------

    def create(self, spec: SandboxSpec) -> Sandbox:
        if not spec.runtime_env_dir.is_dir():
            raise SandboxStartError(
                f"the {spec.runtime.name} runtime environment {spec.runtime_env_dir} is missing; run `execbox build`"
            )
        if spec.network:
            raise SandboxStartError("the gvisor backend runs sandboxes with --network=none; it offers no network")
        if self._platform in _REFUSED_PLATFORMS:
            raise SandboxStartError(f"runsc platform {self._platform}: {_REFUSED_PLATFORMS[self._platform]}")
        seccomp = self._seccomp_section(spec.seccomp_profile or self._seccomp_profile)
        rootfs, binds = self._layout_paths()
        with self._lock:
            make_mount_points(rootfs, spec)
        sandbox_id = sandbox_name("gv")
        bundle, workspace = self._bundles / sandbox_id, self._work / sandbox_id
        memory_limit_bytes = spec.memory_bytes + SENTRY_MEMORY_BYTES
        with contextlib.ExitStack() as stack:
            bundle.mkdir()
            stack.callback(shutil.rmtree, bundle, True)
            workspace.mkdir()
            stack.callback(_remove_workspace, workspace)
            _mount_tmpfs(workspace, spec.workspace_bytes, self._uid)
            cgroup = self._cgroups.create(sandbox_id, memory_limit_bytes, PIDS_BACKSTOP, spec.cpus)
            stack.callback(cgroup.remove)
            config = build_config(
                spec, uid=self._uid, rootfs=rootfs, system_binds=binds, workspace_dir=workspace,
                cgroups_path=f"/{self._cgroups.parent}/{sandbox_id}", memory_limit_bytes=memory_limit_bytes,
                pids_limit=PIDS_BACKSTOP, seccomp=seccomp,
            )  # fmt: skip
            (bundle / "config.json").write_text(json.dumps(config))
            fds: dict[str, int] = {}
            stack.callback(close_all, fds)
            host_end, sandbox_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            fds["control"], fds["channel"] = host_end.detach(), sandbox_end.detach()
            fds["events"] = os.dup(fds["control"])  # supervise() wants one fd per direction
            fds["stdout"], fds["stdout_w"] = os.pipe()
            fds["stderr"], fds["stderr_w"] = os.pipe()
            argv = self._argv(
                *_seccomp_flags(seccomp), f"--log={bundle / 'runsc.log'}", "run",
                "--bundle", str(bundle), "--pid-file", str(bundle / "sandbox.pid"), sandbox_id,
            )  # fmt: skip
            argv = ["/usr/bin/nice", f"--adjustment={spec.warm_nice}", *argv]  # at 0 once leased
            try:
                process = subprocess.Popen(
                    argv, stdin=fds["channel"], stdout=fds["stdout_w"], stderr=fds["stderr_w"],
                    env={}, start_new_session=True,
                )  # fmt: skip
            except OSError as exc:
                raise SandboxStartError(f"cannot start runsc for sandbox {sandbox_id}: {exc}") from exc
            stack.callback(self._delete_state, sandbox_id)
            stack.callback(kill_process, process)
            for name in ("channel", "stdout_w", "stderr_w"):
                os.close(fds.pop(name))
            reader = FrameReader()
            try:
                wait_ready(fds["events"], spec.startup_timeout_s, reader)
                fds["sentry_pidfd"] = os.pidfd_open(int((bundle / "sandbox.pid").read_text()))
            except (SandboxError, OSError, ValueError) as exc:
                said = _what_runsc_said(fds["stderr"], bundle / "runsc.log")
                raise SandboxStartError(f"sandbox {sandbox_id} did not start: {exc}; runsc said: {said}") from exc
            stack.callback(kill_pidfd, fds["sentry_pidfd"])
            release = stack.pop_all()
        return GVisorSandbox(
            spec, sandbox_id, process=process, sentry_pidfd=fds["sentry_pidfd"], cgroup=cgroup, fds=fds,
            reader=reader, workspace_dir=workspace, delete_state=self._delete_state, release=release,
        )  # fmt: skip

    def _delete_state(self, sandbox_id: str) -> None:
        """``runsc delete --force`` when runsc left state for ``sandbox_id`` (the attached
        ``runsc run`` normally deletes it; its files are named ``<id>_sandbox:<id>.*``)."""
        if any(self._root.glob(f"{sandbox_id}_*")):
            self._run_runsc("delete", "--force", sandbox_id)

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
                        _remove_workspace(entry)
                    shutil.rmtree(entry, ignore_errors=True)
                    found.add(entry.name)
        found.update(_reap_cgroups(self._cgroups.root, self._cgroups.parent))
        return len(found)

    def close(self) -> None:
        """Remove this state directory's cgroup parents if no sandbox is left in them."""
        for top in _cgroup_parents(self._cgroups.root, self._cgroups.parent):
            with contextlib.suppress(OSError):  # absent, or still in use
                top.rmdir()


# -- host helpers -------------------------------------------------------------------


def _seccomp_flags(seccomp: dict[str, Any] | None) -> list[str]:
    return ["--oci-seccomp"] if seccomp is not None else []


def _mount_tmpfs(target: Path, size_bytes: int, uid: int) -> None:
    options = f"size={size_bytes},mode=0700,uid={uid},gid={uid}".encode()
    if _libc.mount(b"tmpfs", os.fsencode(target), b"tmpfs", _MS_NOSUID | _MS_NODEV, options) != 0:
        raise SandboxStartError(f"cannot mount the workspace tmpfs at {target}: {os.strerror(ctypes.get_errno())}")


def _umount(target: Path) -> None:
    if _libc.umount2(os.fsencode(target), 0) == 0 or ctypes.get_errno() == errno.EINVAL:  # EINVAL: not mounted
        return
    if _libc.umount2(os.fsencode(target), _MNT_DETACH) != 0:
        raise SandboxError(f"cannot unmount {target}: {os.strerror(ctypes.get_errno())}")


def _mounts_under(directory: Path) -> list[Path]:
    """Mount points below ``directory``, deepest first."""
    prefix = os.path.realpath(directory) + "/"
    with open("/proc/self/mountinfo") as mountinfo:
        targets = [line.split()[4].replace("\\040", " ") for line in mountinfo]
    return sorted((Path(t) for t in targets if t.startswith(prefix)), key=lambda p: len(p.parts), reverse=True)


def _remove_workspace(workspace: Path) -> None:
    for mount_point in _mounts_under(workspace):
        _umount(mount_point)
    for _ in range(8):  # a tmpfs, or several stacked by accident
        if Path(os.path.realpath(workspace)) not in _mounts_under(workspace.parent):
            break
        _umount(workspace)
    with contextlib.suppress(FileNotFoundError):
        workspace.rmdir()


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


def _what_runsc_said(stderr_fd: int, log_path: Path) -> str:
    """runsc's own complaint on a failed start: its stderr (the sandbox's), else its log."""
    if said := read_available(stderr_fd):
        return said
    with contextlib.suppress(OSError):
        return log_path.read_text(errors="replace").strip()[-400:]
    return ""
