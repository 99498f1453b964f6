"""The ``gvisor`` backend: one gVisor (runsc, ptrace platform) sandbox per execution.

Each sandbox is an OCI bundle (:mod:`execbox.isolation.oci`) run with ``runsc run``
under a runsc state root of execbox's own (``<state_dir>/gvisor/state``), always with
``--network=none``: a read-only root of read-only binds (``/usr``, a minimal ``/etc``,
the runtime environment, the driver), gVisor-internal size-capped tmpfs ``/tmp`` and
``/dev/shm``, uid/gid 65534, no capabilities, no_new_privs, rlimits (core 0, file size,
open files, processes), and a host cgroup with memory, CPU and a high pids backstop.
The user's code talks only to the gVisor sentry, never to the host kernel.

* Channels: the driver's control/events channel is a socket given as the container's
  stdin (this runsc passes no other fds); see :mod:`execbox.isolation.oci`.
* Workspace: a size-capped tmpfs mounted on the host per sandbox at
  ``<state_dir>/gvisor/work/<id>`` and bind-mounted read-write at ``/workspace``, so the
  host reads ``artifacts/`` through a plain directory fd; unmounted at destroy.
* OOM: execbox creates the sandbox's memory/pids/cpu cgroups itself
  (``/execbox-gvisor-<hash of the state dir>/<id>``, passed as ``linux.cgroupsPath``;
  runsc uses pre-created cgroups and removes only those it created), so their counters outlive the sandbox.
  Going over the limit makes the host kernel SIGKILL the sentry: runsc exits 137 and
  the cgroup's ``memory.oom_control`` / ``memory.events`` ``oom_kill`` counter is > 0.
  ``oom_killed`` relies on that counter only. The limit is the execution's memory
  plus :data:`SENTRY_MEMORY_BYTES` for gVisor's own kernel; the reported peak
  includes the sentry.
* Teardown: SIGKILL the sentry (through a pidfd); the attached ``runsc run`` then
  deletes its container state and the cgroups it created; execbox removes its own
  cgroup, the workspace mount, the bundle. ``reap()`` removes what a crashed service left.
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
import uuid
from pathlib import Path
from typing import Any

from execbox.errors import BackendUnavailableError, SandboxError, SandboxStartError
from execbox.isolation.base import IsolationBackend, RunOutcome, Sandbox, SandboxSpec
from execbox.isolation.cgroups import Cgroup, CgroupManager
from execbox.isolation.oci import SystemBind, build_config, docker_profile_to_oci, load_docker_profile, probe_config
from execbox.isolation.protocol import FrameReader, encode_request
from execbox.isolation.supervise import supervise, wait_ready
from execbox.models import ExecutionRequest, Limits
from execbox.runtimes import DRIVER_MOUNT, RUNTIME_MOUNT, WORKSPACE, Runtime

__all__ = ["SENTRY_MEMORY_BYTES", "GVisorBackend", "GVisorSandbox"]

log = logging.getLogger("execbox.gvisor")

#: memory allowed on top of the execution's limit for the sentry, gofer and ptrace stubs
SENTRY_MEMORY_BYTES = 64 << 20
#: pids cgroup backstop: gVisor counts its own threads, below ~256 it breaks itself
PIDS_BACKSTOP = 1024
_CGROUP_PARENT = "execbox-gvisor"
_PLATFORMS_REFUSED = {"kvm": "the kvm platform hangs with the sandbox at 100% CPU on this gVisor; use ptrace"}
_ETC_FILES_FROM_HOST = ("ld.so.cache", "localtime", "mime.types")
_ETC_DIRS_FROM_HOST = ("ssl", "alternatives", "fonts")
_MNT_DETACH = 2
_libc = ctypes.CDLL(None, use_errno=True)


def _mount_tmpfs(target: Path, size_bytes: int, uid: int) -> None:
    options = f"size={size_bytes},mode=0700,uid={uid},gid={uid}".encode()
    if _libc.mount(b"tmpfs", str(target).encode(), b"tmpfs", 0x2 | 0x4, options) != 0:  # nosuid, nodev
        code = ctypes.get_errno()
        raise SandboxStartError(f"cannot mount the workspace tmpfs at {target}: {os.strerror(code)}")


def _umount(target: Path) -> None:
    if _libc.umount2(str(target).encode(), 0) == 0:
        return
    code = ctypes.get_errno()
    if code == errno.EINVAL:  # not a mount point (any more)
        return
    if _libc.umount2(str(target).encode(), _MNT_DETACH) != 0:
        raise SandboxError(f"cannot unmount {target}: {os.strerror(ctypes.get_errno())}")


class GVisorSandbox(Sandbox):
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
        delete_state: Any,
        release: contextlib.ExitStack,
    ) -> None:
        super().__init__(spec, sandbox_id)
        self._process = process
        self._sentry_pidfd = sentry_pidfd
        self.cgroup = cgroup
        self._fds = fds
        self._reader = reader
        self._workspace_dir = workspace_dir
        self._delete_state = delete_state
        self._release = release
        self._used = False
        self._destroyed = False
        self._lock = threading.Lock()

    def _kill(self) -> None:
        """SIGKILL the sentry: every process of the sandbox ends with it."""
        with contextlib.suppress(ProcessLookupError, OSError):
            signal.pidfd_send_signal(self._sentry_pidfd, signal.SIGKILL)

    def alive(self) -> bool:
        return not self._used and not self._destroyed and self._process.poll() is None

    def run(self, request: ExecutionRequest, limits: Limits) -> RunOutcome:
        if self._used or self._destroyed:
            raise SandboxError(f"sandbox {self.id} was already used")
        self._used = True
        if limits.memory_bytes < self.spec.memory_bytes:
            self.cgroup.set_memory_limit(limits.memory_bytes + SENTRY_MEMORY_BYTES)
        seen = supervise(
            control_fd=self._fds["control"],
            events_fd=self._fds["events"],
            stdout_fd=self._fds["stdout"],
            stderr_fd=self._fds["stderr"],
            payload=encode_request(request),
            wall_time_s=min(limits.wall_time_s, self.spec.wall_time_s),
            output_bytes=min(limits.output_bytes, self.spec.output_bytes),
            kill=self._kill,
            reader=self._reader,
        )
        exit_code = signal_number = None
        if seen.report is None:
            try:
                status = self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._kill()
                status = self._process.wait(timeout=5)
            # runsc exits with the driver's status, 128 + the signal that ended it, 137 when
            # the sentry itself was killed (OOM, or by us)
            if seen.timed_out or seen.output_capped:
                pass  # we killed it: the verdict says why
            elif status > 128:
                signal_number = status - 128
            elif status >= 0:
                exit_code = status
        return RunOutcome(
            stdout=seen.stdout,
            stderr=seen.stderr,
            report=seen.report,
            exit_code=exit_code,
            signal=signal_number,
            timed_out=seen.timed_out,
            output_capped=seen.output_capped,
            oom_killed=self.cgroup.oom_kills() > 0,
            wall_time_ms=seen.wall_time_ms,
            memory_peak_bytes=self.cgroup.memory_peak_bytes(),
            cpu_time_ms=self.cgroup.cpu_time_ms(),
        )

    def open_workspace(self) -> int:
        """The host-side workspace tmpfs (the same files the sandbox sees at /workspace)."""
        if self._destroyed or self._process.poll() is not None:
            raise SandboxError(f"sandbox {self.id} has ended; its workspace is gone")
        return os.open(self._workspace_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)

    def destroy(self) -> None:
        with self._lock:
            if self._destroyed:
                return
            self._destroyed = True
        try:
            self._kill()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=10)
            self._delete_state(self.id)
        finally:
            self._release.close()


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
        self._runsc = runsc
        self._platform = platform
        # one cgroup parent per state directory: reap() never touches another instance's sandboxes
        digest = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:8]
        self._cgroups = cgroups or CgroupManager(parent=f"{_CGROUP_PARENT}-{digest}")
        self._seccomp: dict[Path, dict[str, Any]] = {}
        self._layout: tuple[Path, list[SystemBind]] | None = None
        self._lock = threading.Lock()

    def _argv(self, *args: str) -> list[str]:
        return [self._runsc, "--root", str(self._root), "--network=none", f"--platform={self._platform}", *args]

    def _runsc_quiet(self, *args: str, timeout_s: float = 30) -> subprocess.CompletedProcess[bytes]:
        try:
            return subprocess.run(self._argv(*args), capture_output=True, timeout=timeout_s, check=False, env={})
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise SandboxError(f"runsc {' '.join(args)} failed: {exc}") from exc

    # -- host checks -----------------------------------------------------------------

    def check(self) -> None:
        if not os.access(self._runsc, os.X_OK):
            raise BackendUnavailableError(
                f"runsc (gVisor) is not installed at {self._runsc}: apt-get install runsc "
                "(Debian/Ubuntu), or see https://gvisor.dev/docs/user_guide/install/"
            )
        if self._platform in _PLATFORMS_REFUSED:
            raise BackendUnavailableError(f"runsc platform {self._platform}: {_PLATFORMS_REFUSED[self._platform]}")
        if os.geteuid() != 0:
            raise BackendUnavailableError("the gvisor backend needs root (runsc sandboxes, cgroups, workspace mounts)")
        self._cgroups.check()
        platforms = subprocess.run([self._runsc, "help", "platforms"], capture_output=True, check=False).stdout
        if self._platform.encode() not in platforms:
            raise BackendUnavailableError(
                f"this runsc does not know the platform {self._platform!r} (it offers: "
                f"{platforms.decode(errors='replace').split(':', 1)[-1].strip()}); use ptrace"
            )
        self._layout_paths()
        seccomp = self._seccomp_section(self._seccomp_profile)
        probe = f"probe-{uuid.uuid4().hex[:8]}"
        bundle = self._bundles / probe
        bundle.mkdir(parents=True)
        try:
            rootfs, _ = self._layout_paths()
            config = probe_config(rootfs, self._uid, seccomp)
            (bundle / "config.json").write_text(json.dumps(config))
            try:
                done = subprocess.run(
                    self._argv(*self._seccomp_flags(seccomp), f"--log={bundle / 'runsc.log'}", "run",
                               "--bundle", str(bundle), probe),
                    stdin=subprocess.DEVNULL, capture_output=True, timeout=60, check=False, env={},
                )
            except subprocess.TimeoutExpired as exc:
                raise BackendUnavailableError(
                    f"runsc did not run a tiny sandbox within 60 s (platform {self._platform}); "
                    "check `runsc --platform=ptrace do true`"
                ) from exc
            self._delete_state(probe)
            detail = (done.stderr or done.stdout).decode(errors="replace").strip()[-400:]
            if seccomp is not None and done.returncode == 0:
                raise BackendUnavailableError(
                    "SANDBOX_ENABLE_SECCOMP is set but this runsc ignores OCI seccomp profiles; "
                    "upgrade gVisor or unset SANDBOX_ENABLE_SECCOMP"
                )
            if seccomp is not None and b"not permitted" not in done.stderr:
                raise BackendUnavailableError(
                    f"runsc cannot apply the seccomp profile {self._seccomp_profile} (exit {done.returncode}: "
                    f"{detail}); fix the profile or unset SANDBOX_ENABLE_SECCOMP"
                )
            if seccomp is None and (done.returncode != 0 or b"Linux" not in done.stdout):
                raise BackendUnavailableError(
                    f"runsc cannot start a sandbox (exit {done.returncode}: {detail}); "
                    "run `runsc --network=none --platform=ptrace do true` to see why; "
                    "reinstall with apt-get install runsc"
                )
        finally:
            shutil.rmtree(bundle, ignore_errors=True)

    def _seccomp_flags(self, seccomp: dict[str, Any] | None) -> list[str]:
        return ["--oci-seccomp"] if seccomp is not None else []

    def _seccomp_section(self, profile: Path | None) -> dict[str, Any] | None:
        """The OCI seccomp section for ``profile`` (cached); raises when runsc cannot apply it."""
        if profile is None:
            return None
        with self._lock:
            if profile in self._seccomp:
                return self._seccomp[profile]
        flags = subprocess.run([self._runsc, "flags"], capture_output=True, check=False)
        if b"oci-seccomp" not in flags.stdout + flags.stderr:
            raise BackendUnavailableError(
                "SANDBOX_ENABLE_SECCOMP is set but this runsc cannot apply OCI seccomp profiles "
                "(no --oci-seccomp flag); upgrade gVisor or unset SANDBOX_ENABLE_SECCOMP"
            )
        section, notes = docker_profile_to_oci(load_docker_profile(profile))
        for note in notes:
            log.info("seccomp profile %s: %s", profile.name, note)
        with self._lock:
            self._seccomp[profile] = section
        return section

    def _layout_paths(self) -> tuple[Path, list[SystemBind]]:
        """The shared read-only root skeleton and the minimal /etc (built once)."""
        with self._lock:
            if self._layout is not None:
                return self._layout
            for path in (self._root, self._bundles, self._work):
                path.mkdir(parents=True, exist_ok=True)
            rootfs, etc = self._dir / "rootfs", self._dir / "etc"
            # built in place and idempotently: running sandboxes (of another instance) may use them
            binds = [SystemBind(Path("/usr"), "/usr")]
            rootfs.mkdir(parents=True, exist_ok=True)
            for name in ("bin", "lib", "lib64", "sbin"):
                host = Path("/", name)
                if host.is_symlink() and not (rootfs / name).is_symlink():
                    (rootfs / name).symlink_to(os.readlink(host))
                elif host.is_dir() and not host.is_symlink():
                    binds.append(SystemBind(host, f"/{name}"))
            etc.mkdir(parents=True, exist_ok=True)
            uid = self._uid
            files = {
                "passwd": f"root:x:0:0:root:/root:/usr/sbin/nologin\nsandbox:x:{uid}:{uid}::/tmp:/usr/sbin/nologin\n",
                "group": f"root:x:0:\nsandbox:x:{uid}:\n",
                "hosts": "127.0.0.1 localhost sandbox\n::1 localhost sandbox\n",
                "hostname": "sandbox\n",
                "nsswitch.conf": "passwd: files\ngroup: files\nhosts: files dns\n",
            }
            contents = {name: text.encode() for name, text in files.items()}
            contents.update({n: Path("/etc", n).read_bytes() for n in _ETC_FILES_FROM_HOST if Path("/etc", n).is_file()})
            for name, data in contents.items():
                temporary = etc / f".{name}.tmp"
                temporary.write_bytes(data)
                temporary.chmod(0o644)
                os.replace(temporary, etc / name)
            binds.append(SystemBind(etc, "/etc"))
            for name in _ETC_DIRS_FROM_HOST:
                (etc / name).mkdir(exist_ok=True)
                if Path("/etc", name).is_dir():
                    binds.append(SystemBind(Path("/etc", name), f"/etc/{name}"))
            for target in ("usr", "etc", "proc", "dev", "sys", "tmp", WORKSPACE, RUNTIME_MOUNT, DRIVER_MOUNT):
                (rootfs / target.lstrip("/")).mkdir(parents=True, exist_ok=True)
            self._layout = (rootfs, binds)
            return self._layout

    def _mount_points(self, rootfs: Path, spec: SandboxSpec) -> None:
        """Create what the spec mounts over in the shared skeleton (binds need a mount point)."""
        runtime: Runtime = spec.runtime
        driver = rootfs / DRIVER_MOUNT.lstrip("/") / runtime.driver_path.name
        wanted = [(driver, False)]
        wanted += [(rootfs / m.target.lstrip("/"), m.source.is_dir()) for m in spec.mounts]
        with self._lock:
            for path, is_dir in wanted:
                if is_dir:
                    path.mkdir(parents=True, exist_ok=True)
                elif not path.exists():
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.touch()

    # -- sandboxes -------------------------------------------------------------------

    def create(self, spec: SandboxSpec) -> Sandbox:
        if not spec.runtime_env_dir.is_dir():
            raise SandboxStartError(
                f"the {spec.runtime.name} runtime environment {spec.runtime_env_dir} is missing; run `execbox build`"
            )
        if spec.network:
            raise SandboxStartError("the gvisor backend runs sandboxes with --network=none; network access is not offered")
        if self._platform in _PLATFORMS_REFUSED:
            raise SandboxStartError(f"runsc platform {self._platform}: {_PLATFORMS_REFUSED[self._platform]}")
        seccomp = self._seccomp_section(spec.seccomp_profile or self._seccomp_profile)
        rootfs, binds = self._layout_paths()
        self._mount_points(rootfs, spec)
        sandbox_id = f"gv-{uuid.uuid4().hex[:12]}"
        bundle, workspace = self._bundles / sandbox_id, self._work / sandbox_id
        with contextlib.ExitStack() as stack:
            bundle.mkdir()
            stack.callback(shutil.rmtree, bundle, True)
            workspace.mkdir()
            stack.callback(_remove_workspace, workspace)
            _mount_tmpfs(workspace, spec.workspace_bytes, self._uid)
            cgroup = self._cgroups.create(sandbox_id, spec.memory_bytes + SENTRY_MEMORY_BYTES, PIDS_BACKSTOP, spec.cpus)
            stack.callback(cgroup.remove)
            config = build_config(
                spec, uid=self._uid, rootfs=rootfs, system_binds=binds, workspace_dir=workspace,
                cgroups_path=f"/{self._cgroups.parent}/{sandbox_id}", memory_limit_bytes=spec.memory_bytes + SENTRY_MEMORY_BYTES,
                pids_limit=PIDS_BACKSTOP, seccomp=seccomp,
            )
            (bundle / "config.json").write_text(json.dumps(config))
            fds: dict[str, int] = {}
            stack.callback(_close_all, fds)
            host_end, sandbox_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            fds["control"], fds["channel_in"] = host_end.detach(), sandbox_end.detach()
            fds["events"] = os.dup(fds["control"])
            fds["stdout"], fds["stdout_w"] = os.pipe()
            fds["stderr"], fds["stderr_w"] = os.pipe()
            argv = self._argv(*self._seccomp_flags(seccomp), f"--log={bundle / 'runsc.log'}", "run",
                              "--bundle", str(bundle), "--pid-file", str(bundle / "sandbox.pid"), sandbox_id)
            try:
                process = subprocess.Popen(
                    argv, stdin=fds["channel_in"], stdout=fds["stdout_w"], stderr=fds["stderr_w"],
                    env={}, start_new_session=True,
                )
            except OSError as exc:
                raise SandboxStartError(f"cannot start runsc for sandbox {sandbox_id}: {exc}") from exc
            stack.callback(self._delete_state, sandbox_id)
            stack.callback(_kill_process, process)
            for name in ("channel_in", "stdout_w", "stderr_w"):
                os.close(fds.pop(name))
            reader = FrameReader()
            try:
                wait_ready(fds["events"], spec.startup_timeout_s, reader)
                fds["sentry_pidfd"] = sentry_pidfd = os.pidfd_open(int((bundle / "sandbox.pid").read_text()))
            except (SandboxError, OSError, ValueError) as exc:
                detail = _read_available(fds["stderr"]) or _tail(bundle / "runsc.log")
                raise SandboxStartError(f"sandbox {sandbox_id} did not start: {exc}; runsc said: {detail}") from exc
            stack.callback(_kill_pidfd, sentry_pidfd)
            release = stack.pop_all()
        # on destroy: what the stack undoes, minus the process kill already done by the sandbox
        return GVisorSandbox(
            spec, sandbox_id, process=process, sentry_pidfd=sentry_pidfd, cgroup=cgroup, fds=fds,
            reader=reader, workspace_dir=workspace, delete_state=self._delete_state, release=release,
        )

    def _delete_state(self, sandbox_id: str) -> None:
        """``runsc delete --force`` if runsc left state for ``sandbox_id`` (it normally cleans up)."""
        if any(self._root.glob(f"{sandbox_id}_*")):
            self._runsc_quiet("delete", "--force", sandbox_id)

    def reap(self) -> int:
        """Remove what a crashed service left: runsc containers, workspaces, bundles, cgroups."""
        reaped = 0
        if self._root.is_dir() and os.access(self._runsc, os.X_OK):
            listed = self._runsc_quiet("list", "--quiet")
            for sandbox_id in listed.stdout.decode().split():
                self._runsc_quiet("kill", sandbox_id, "KILL")
                self._runsc_quiet("delete", "--force", sandbox_id)
                reaped += 1
        if self._work.is_dir():
            for workspace in self._work.iterdir():
                _remove_workspace(workspace)
                reaped += 1
        for mount_point in _mounts_under(self._work):  # stacked or orphaned mounts
            _umount(mount_point)
        if self._bundles.is_dir():
            for bundle in self._bundles.iterdir():
                shutil.rmtree(bundle, ignore_errors=True)
                reaped += 1
        return reaped + _reap_cgroups(self._cgroups.root, self._cgroups.parent)


def _reap_cgroups(root: Path, parent: str) -> int:
    """Kill and remove every cgroup under ``parent`` in every hierarchy (runsc creates some
    in hierarchies execbox does not use: blkio, cpuset, devices...)."""
    names: set[str] = set()
    dirs = [root / parent] + [h / parent for h in root.iterdir() if h.is_dir() and not h.is_symlink()]
    for top in dirs:
        if not top.is_dir():
            continue
        for group in [p for p in top.iterdir() if p.is_dir()]:
            names.add(group.name)
            for _ in range(100):
                pids = (group / "cgroup.procs").read_text().split() if (group / "cgroup.procs").exists() else []
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
                try:
                    group.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.02)
    return len(names)


def _mounts_under(directory: Path) -> list[Path]:
    prefix = str(directory.resolve()) + "/" if directory.exists() else str(directory) + "/"
    found = []
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            target = line.split()[4].replace("\\040", " ")
            if target.startswith(prefix):
                found.append(Path(target))
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def _remove_workspace(workspace: Path) -> None:
    for mount_point in _mounts_under(workspace.parent):
        if mount_point == workspace:
            _umount(mount_point)
    with contextlib.suppress(FileNotFoundError):
        workspace.rmdir()


def _close_all(fds: dict[str, int]) -> None:
    while fds:
        _, fd = fds.popitem()
        with contextlib.suppress(OSError):
            os.close(fd)


def _kill_process(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        process.kill()
    process.wait()


def _kill_pidfd(pidfd: int) -> None:
    with contextlib.suppress(ProcessLookupError, OSError):
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)


def _read_available(fd: int) -> str:
    os.set_blocking(fd, False)
    try:
        return os.read(fd, 4096).decode(errors="replace").strip()
    except OSError:
        return ""


def _tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace").strip()[-400:]
    except OSError:
        return ""
