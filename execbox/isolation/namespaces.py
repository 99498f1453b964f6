"""The ``namespaces`` backend: bubblewrap sandboxes with seccomp, cgroups and rlimits.

Each sandbox: new user, mount, PID, network, IPC, UTS and cgroup namespaces (bwrap
``--unshare-all``); a read-only root of read-only binds (``/usr``, a synthesized
``/etc``, the runtime environment, the driver) plus size-capped tmpfs ``/workspace``,
``/tmp`` and ``/dev/shm``; an unprivileged host uid of its own (one per live sandbox,
so per-uid limits never couple two sandboxes); no capabilities; no_new_privs; the
built-in seccomp filter; a cgroup with memory, pids and CPU limits; rlimits (core 0,
file size, open files, processes, set by prlimit(1) before bwrap starts). bwrap runs
unprivileged as the sandbox's uid; the host puts the sandbox's init into its cgroup
while bwrap waits on ``--block-fd``, before any user code exists. With egress
(``spec.egress``) a sandbox also gets its own proxy socket's directory, read-only at
``EGRESS_DIR``, an up loopback interface (bwrap raises it; the fork server's zygote too)
and a filter that allows AF_INET/AF_INET6 sockets, which reach nothing but that loopback.

Under gVisor (execbox in a pod under a gVisor RuntimeClass) only the fork server
launcher works: bubblewrap cannot configure a new network namespace there, and the
zygote runs in its unshare mode (gVisor has no setns for PID namespaces). The start-up
check builds one sandbox with the launcher that will be used, so it fails where
sandboxes would. gVisor has no pidfd_open either: the zygote, the init's parent, kills
a sandbox there. gVisor's cgroups count memory but do not limit it: each execution's
limit is then kept by a :class:`~execbox.isolation.memwatch.MemoryWatch`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from execbox.errors import BackendUnavailableError, SandboxError, SandboxStartError
from execbox.isolation.base import IsolationBackend, Sandbox, SandboxSpec
from execbox.isolation.cgroups import Cgroup, CgroupManager
from execbox.isolation.forkserver import (
    ForkServer,
    exit_pair,
    host_view,
    probe_plan,
    zygote_launcher,
)
from execbox.isolation.hostproc import (
    close_all,
    driver_pipes,
    kill_pidfd,
    kill_process,
    open_dir_nofollow,
)
from execbox.isolation.memwatch import (
    WATCH_INTERVAL_S,
    MemoryWatch,
    cgroups_enforce_memory,
)
from execbox.isolation.owners import sandbox_name
from execbox.isolation.protocol import FrameReader
from execbox.isolation.rootfs import Op, PlanStep, egress_step, mount_plan, publish_etc
from execbox.isolation.seccomp import filter_bpf
from execbox.isolation.supervise import SupervisedSandbox, await_ready
from execbox.isolation.uids import UID_LOCK_DIR, UidAllocator
from execbox.models import Limits
from execbox.runtimes import (
    CONTROL_FD_ENV,
    DRIVER_MOUNT,
    EVENTS_FD_ENV,
    RUNTIME_MOUNT,
    SYSTEM_PYTHON,
    WORKSPACE,
)

log = logging.getLogger("execbox.namespaces")

__all__ = ["UID_LOCK_DIR", "NamespacesBackend", "NamespacesSandbox", "UidAllocator", "bwrap_mount_args", "bwrap_options"]

_BWRAP = "/usr/bin/bwrap"
_PRLIMIT = "/usr/bin/prlimit"
_SETPRIV = "/usr/bin/setpriv"
_NICE = "/usr/bin/nice"
_NSENTER = "/usr/bin/nsenter"


def bwrap_mount_args(plan: Sequence[PlanStep]) -> list[str]:
    """bwrap's arguments for a mount plan, in its order."""
    args: list[str] = []
    for step in plan:
        if step.op is Op.TMPFS:
            args += ["--size", str(step.size_bytes), "--tmpfs", step.target]
        elif step.op in (Op.PROC, Op.DEV):
            args += [f"--{step.op.value}", step.target]
        else:  # binds and symlinks: source (link text), then target
            args += [f"--{step.op.value}", step.source, step.target]
    return args


def bwrap_options(spec: SandboxSpec, fds: Mapping[str, int], plan: Sequence[PlanStep]) -> list[str]:
    """bwrap's options for one sandbox of ``spec`` built from ``plan``, with its channel fds."""
    # (bwrap brings up the loopback interface of the network namespace it unshares)
    options = ["--unshare-all", "--die-with-parent", "--new-session", "--hostname", "sandbox"]
    options += bwrap_mount_args(plan)
    options += ["--remount-ro", "/", "--chdir", WORKSPACE, "--clearenv"]
    for key, value in spec.env.items():
        options += ["--setenv", key, value]
    options += ["--setenv", CONTROL_FD_ENV, str(fds["control_r"]), "--setenv", EVENTS_FD_ENV, str(fds["events_w"])]
    options += ["--seccomp", str(fds["seccomp"]), "--info-fd", str(fds["info_w"]), "--block-fd", str(fds["block_r"])]
    return options


class NamespacesSandbox(SupervisedSandbox):
    """A sandbox whose init (``init_pid``) heads fresh namespaces, in its own cgroup.

    How it was started (bwrap, or a fork of the Python fork server) is hidden behind three
    callables: ``kill`` (SIGKILL the init, so every process of the sandbox),
    ``exit_status`` (see SupervisedSandbox._exit_status) and ``running``. ``root_pid`` is a
    process whose root is the sandbox's (the init, except in the zygote's unshare mode).
    ``watch_memory``: the cgroup does not enforce the memory limit, a MemoryWatch does.
    """

    backend_name = "namespaces"

    def __init__(
        self,
        spec: SandboxSpec,
        sandbox_id: str,
        *,
        init_pid: int,
        root_pid: int,
        kill: Callable[[], None],
        cgroup: Cgroup,
        fds: dict[str, int],
        reader: FrameReader,
        exit_status: Callable[[float], tuple[int | None, int | None]],
        running: Callable[[], bool],
        release: contextlib.ExitStack,
        watch_memory: bool = False,
    ) -> None:
        super().__init__(spec, sandbox_id, cgroup=cgroup, fds=fds, reader=reader, release=release)
        self._watch_memory = watch_memory
        self._watch: MemoryWatch | None = None
        self.init_pid = init_pid
        self._root_pid = root_pid
        self._kill_of = kill
        self._exit_status_of = exit_status
        self._running_of = running

    def _kill(self) -> None:
        self._kill_of()

    def _limit_memory(self, limits: Limits) -> None:
        super()._limit_memory(limits)
        if self._watch_memory:
            self._watch = MemoryWatch(self.cgroup, min(limits.memory_bytes, self.spec.memory_bytes), self._kill)

    def _usage(self) -> tuple[bool, int | None, float | None]:
        oom, peak, cpu = super()._usage()
        watch, self._watch = self._watch, None
        if watch is None:
            return oom, peak, cpu
        exceeded, seen = watch.stop()
        return oom or exceeded, peak if peak is not None else seen, cpu

    def _teardown(self) -> None:
        if self._watch is not None:
            self._watch.stop()
        super()._teardown()

    def _exit_status(self, timeout_s: float) -> tuple[int | None, int | None]:
        return self._exit_status_of(timeout_s)

    def _running(self) -> bool:
        return self._running_of()

    def open_workspace(self) -> int:
        """Open the live sandbox's workspace through its init's root, following no symlink."""
        if not self._running():
            raise SandboxError(f"sandbox {self.id} has ended; its workspace is gone")
        root = os.open(f"/proc/{self._root_pid}/root", os.O_PATH | os.O_DIRECTORY)
        try:
            return open_dir_nofollow(WORKSPACE.lstrip("/"), root)
        finally:
            os.close(root)


class NamespacesBackend(IsolationBackend):
    """Builds bubblewrap sandboxes; see the module docstring for what each one gets."""

    name = "namespaces"

    def __init__(
        self,
        state_dir: Path,
        uid_base: int,
        uid_count: int,
        cgroups: CgroupManager | None = None,
        forkserver: bool = True,
    ) -> None:
        self._state_dir = state_dir / "namespaces"
        self._use_forkserver = forkserver
        self._forkservers: dict[str, ForkServer] = {}
        #: bwrap launcher: per spec, an fd of the mount namespace holding its view
        self._views: dict[str, int] = {}
        #: per spec, its view and the plan its sandboxes are built with (``_view``)
        self._spec_views: dict[str, tuple[dict[str, Any], list[PlanStep]]] = {}
        self._spec_keys: dict[int, str] = {}
        self._uids = UidAllocator(uid_base, uid_count, UID_LOCK_DIR)
        self._uid_range = (uid_base, uid_count)
        self._cgroups = cgroups or CgroupManager()
        self._pid_namespaces = ""
        self._watch_memory = not cgroups_enforce_memory(self._cgroups)
        self._etc_dir: Path | None = None
        self._lock = threading.RLock()

    # -- host checks -----------------------------------------------------------------

    def check(self) -> None:
        if os.geteuid() != 0:
            raise BackendUnavailableError("the namespaces backend needs root (cgroups, per-sandbox uids)")
        self._cgroups.check()
        filter_bpf(inet=False)
        if self._use_forkserver:
            self._pid_namespaces = self._probe_forkserver()
            return
        if not Path(_BWRAP).exists():
            raise BackendUnavailableError("bubblewrap is not installed: apt-get install bubblewrap")
        for tool in (_PRLIMIT, _SETPRIV):
            if not Path(tool).exists():
                raise BackendUnavailableError(f"{tool} is missing: apt-get install util-linux")
        probe = self._bwrap_probe()
        if probe.returncode == 0:
            return
        said = probe.stderr.decode(errors="replace").strip()
        try:
            mode = self._probe_forkserver()
        except BackendUnavailableError:
            mode = ""
        if mode:
            gvisor = " (the kernel is gVisor's: no setns for PID namespaces)" if mode == "unshare" else ""
            raise BackendUnavailableError(
                f"SANDBOX_FORKSERVER=false: bwrap cannot build a sandbox on this kernel{gvisor} ({said}); "
                "the fork server can: set SANDBOX_FORKSERVER=true"
            )
        raise BackendUnavailableError(
            f"bwrap cannot create an unprivileged user namespace: {said}; enable it with "
            "sysctl -w kernel.unprivileged_userns_clone=1 (Debian) or "
            "sysctl -w user.max_user_namespaces=15000"
        )

    def _bwrap_probe(self) -> subprocess.CompletedProcess[bytes]:
        """bwrap runs /usr/bin/true in fresh namespaces as the last sandbox uid."""
        try:
            return subprocess.run(
                [_BWRAP, "--unshare-all", "--ro-bind", "/usr", "/usr", "--symlink", "usr/bin", "/bin",
                 "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64", "/usr/bin/true"],
                user=self._uid_range[0] + self._uid_range[1] - 1, group=self._uid_range[0] + self._uid_range[1] - 1,
                extra_groups=[], capture_output=True, env={}, timeout=30, check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise BackendUnavailableError(f"bwrap did not run a probe sandbox: {exc}") from exc

    def _probe_forkserver(self) -> str:
        """Have a fork server build one sandbox the way sandboxes are built (namespaces,
        mounts, cgroup, uid, rlimits, the seccomp filter), which runs /usr/bin/true; returns
        the zygote's PID-namespace mode ("setns" or "unshare")."""
        view, plan = host_view(probe_plan(), self._view_root(), SYSTEM_PYTHON)
        server = ForkServer(
            zygote_launcher(Path(SYSTEM_PYTHON), {}), root_dir=view["sandbox_root"], plan=plan,
            seccomp_bpf=filter_bpf(inet=False), env={}, loopback=False, preload="", driver=None,
            exec_argv=["/usr/bin/true"], view=view,
        )  # fmt: skip
        with contextlib.ExitStack() as stack:
            try:
                server.start(timeout_s=30.0)
                stack.callback(server.close)
                sandbox_id = sandbox_name("probe")
                uid = self._uids.acquire()
                stack.callback(self._uids.release, uid)
                cgroup = self._cgroups.create(sandbox_id, 64 << 20, 16, 1.0)
                stack.callback(cgroup.remove)
                failed = server.probe(sandbox_id, uid, cgroup.procs_files())
            except (SandboxError, TimeoutError) as exc:
                failed = str(exc)
        if failed:
            raise BackendUnavailableError(f"the fork server cannot build a sandbox: {failed}")
        return server.pid_namespaces

    def _view_root(self) -> Path:
        """The host directory each zygote mounts its view on, in its own mount namespace
        (the host never sees a mount there)."""
        root = self._state_dir / "root"
        root.mkdir(parents=True, exist_ok=True)
        return root

    def _etc(self) -> Path:
        return publish_etc(self._state_dir, *self._uid_range)

    # -- sandboxes -------------------------------------------------------------------

    def _bwrap_argv(self, spec: SandboxSpec, fds: dict[str, int], uid: int, extra: list[PlanStep]) -> list[str]:
        # nsenter enters the spec's view (as root), where every bind's source is its target;
        # setpriv(1) drops to the sandbox uid (so the service can vfork: no Popen(user=...)),
        # then prlimit(1) sets the rlimits that bwrap and the program inherit
        argv = [
            _NSENTER,
            f"--mount={self._bwrap_view(spec)}",
            "--",
            _SETPRIV,
            f"--reuid={uid}",
            f"--regid={uid}",
            "--clear-groups",
            "--",
            _PRLIMIT,
            f"--nproc={spec.pids_max}",
            "--core=0",
            f"--fsize={spec.file_size_max_bytes}",
            f"--nofile={spec.open_files_max}",
            "--",
            _NICE,
            f"--adjustment={spec.warm_nice}",
            _BWRAP,
        ]
        # bwrap's options come from a memfd (--args), so the command line of the sandbox's
        # pid 1, which the program can read, names none of them
        fds["args"] = os.memfd_create("execbox-bwrap-args")
        options = bwrap_options(spec, fds, [*self._view(spec)[1], *extra])  # the view's plan
        os.write(fds["args"], b"".join(arg.encode() + b"\0" for arg in options))
        os.lseek(fds["args"], 0, os.SEEK_SET)
        return [*argv, "--args", str(fds["args"]), "--", *spec.runtime.argv()]

    def create(self, spec: SandboxSpec) -> Sandbox:
        if not spec.runtime_env_dir.is_dir():
            raise SandboxStartError(
                f"the {spec.runtime.name} runtime environment {spec.runtime_env_dir} is missing; run `execbox build`"
            )
        if self._use_forkserver:
            return self._create_forked(spec)
        return self._create_bwrap(spec)

    def preloads(self, spec: SandboxSpec) -> bool:
        return self._use_forkserver and spec.forks_preloaded

    def _spec_key(self, spec: SandboxSpec) -> str:
        key = self._spec_keys.get(id(spec))
        if key is None:  # specs are built once per pool: compute the key once
            key = self._spec_keys.setdefault(id(spec), repr(spec))
        return key

    def _view(self, spec: SandboxSpec) -> tuple[dict[str, Any], list[PlanStep]]:
        """The view of the host a spec's sandboxes are built from and the plan they are built
        with (see ``host_view``), made once per spec: bwrap reads the plan for every sandbox."""
        key = self._spec_key(spec)
        with self._lock:
            made = self._spec_views.get(key)
            if made is None:
                inside = f"{RUNTIME_MOUNT}/bin/python3" if spec.runtime.driver_in_process else SYSTEM_PYTHON
                host_dirs = [str(spec.egress.directory)] if spec.egress is not None else []
                made = host_view(mount_plan(spec, self._etc()), self._view_root(), inside, host_dirs)
                self._spec_views[key] = made
            return made

    def _bwrap_view(self, spec: SandboxSpec) -> str:
        """bwrap launcher: the path of the mount namespace its sandboxes start from, one whose
        root is the spec's view, built by a zygote that imports nothing and is stopped once
        its namespace is held by an fd of this process (the namespace and its mounts end
        with that fd, at the latest with the service)."""
        key = self._spec_key(spec)
        with self._lock:
            fd = self._views.get(key)
            if fd is None:
                view = self._view(spec)[0]
                server = ForkServer(
                    zygote_launcher(Path(SYSTEM_PYTHON), {}), root_dir=view["sandbox_root"], plan=[],
                    seccomp_bpf=b"", env={}, loopback=False, preload="", driver=None, exec_argv=["/usr/bin/true"],
                    view=view,
                )  # fmt: skip
                try:
                    server.start(timeout_s=60.0)
                    assert server.process is not None
                    fd = os.open(f"/proc/{server.process.pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
                except OSError as exc:
                    raise SandboxStartError(f"cannot hold the sandboxes' view: {exc}") from exc
                finally:
                    server.close()
                self._views[key] = fd
        return f"/proc/{os.getpid()}/fd/{fd}"

    def _forkserver(self, spec: SandboxSpec) -> ForkServer:
        """The running zygote for this spec, started (or restarted) on demand."""
        key = self._spec_key(spec)
        with self._lock:
            server = self._forkservers.get(key)
            if server is not None and server.alive:
                return server
            if server is not None:
                server.close()
            runtime = spec.runtime
            # the zygote starts on the host and again inside its view, where the runtime is at
            # RUNTIME_MOUNT: a Python zygote is the runtime's interpreter (its paths are then
            # the sandboxes'), any other runtime's is the system Python
            interpreter = spec.runtime_env_dir / "bin" / "python3" if runtime.driver_in_process else Path(SYSTEM_PYTHON)
            view, plan = self._view(spec)
            server = ForkServer(
                zygote_launcher(interpreter, spec.env),
                root_dir=view["sandbox_root"],
                plan=plan,
                seccomp_bpf=filter_bpf(spec.egress is not None),
                env=spec.env,
                loopback=spec.egress is not None,
                preload=",".join(spec.preload_modules),
                driver=f"{DRIVER_MOUNT}/{runtime.driver_path.name}" if runtime.driver_in_process else None,
                exec_argv=None if runtime.driver_in_process else runtime.argv(),
                nice=spec.warm_nice,
                view=view,
            )
            server.start()
            self._forkservers[key] = server
            return server

    def _allocate(
        self, stack: contextlib.ExitStack, spec: SandboxSpec
    ) -> tuple[str, int, Cgroup, dict[str, int], list[PlanStep]]:
        """A sandbox's name, uid, cgroup, channel pipes and its own mount steps (its egress
        socket), each undone by ``stack``.

        fds: host ends ``control`` (host -> driver), ``events`` (driver -> host), ``stdout``,
        ``stderr``; the sandbox's ends ``control_r``, ``events_w``, ``stdout_w``, ``stderr_w``.
        """
        sandbox_id = sandbox_name("ns")
        uid = self._uids.acquire()
        stack.callback(self._uids.release, uid)
        cgroup = self._cgroups.acquire(sandbox_id, spec.memory_bytes, spec.pids_max, spec.cpus)
        stack.callback(self._cgroups.release, cgroup)
        fds: dict[str, int] = {}
        stack.callback(close_all, fds)
        driver_pipes(fds)
        extra: list[PlanStep] = []
        if spec.egress is not None:
            extra.append(egress_step(spec.egress.open(sandbox_id)))
            stack.callback(spec.egress.close, sandbox_id)
        return sandbox_id, uid, cgroup, fds, extra

    def _create_forked(self, spec: SandboxSpec) -> Sandbox:
        """A sandbox cloned by the fork server: about the cost of a fork."""
        server = self._forkserver(spec)
        with contextlib.ExitStack() as stack:
            sandbox_id, uid, cgroup, fds, extra = self._allocate(stack, spec)
            # unshare mode is gVisor's kernel, which does not count a process's first thread
            # against RLIMIT_NPROC as Linux does (nor threads in pids.max): one less keeps
            # "processes + threads <= SANDBOX_MAX_PIDS" the same on both, as in gvisor_host
            nproc = max(1, spec.pids_max - 1) if server.pid_namespaces == "unshare" else spec.pids_max
            rlimits = {"nproc": nproc, "core": 0, "fsize": spec.file_size_max_bytes, "nofile": spec.open_files_max}
            child_ends = [fds["control_r"], fds["events_w"], fds["stdout_w"], fds["stderr_w"]]
            pid, init_pid = server.spawn(sandbox_id, uid, cgroup.procs_files(), rlimits, child_ends, extra)
            for name in ("control_r", "events_w", "stdout_w", "stderr_w"):
                os.close(fds.pop(name))
            kill = server.init_killer(fds, sandbox_id, pid, init_pid, uid)

            def reap() -> None:
                kill()
                try:
                    server.wait_exit(pid, 10.0)
                except TimeoutError as exc:
                    raise SandboxError(f"sandbox {sandbox_id} (pid {pid}) did not exit after SIGKILL") from exc
                finally:
                    server.forget(pid)

            stack.callback(reap)
            reader = await_ready(fds, spec, sandbox_id)
            release = stack.pop_all()
        return NamespacesSandbox(
            spec,
            sandbox_id,
            init_pid=init_pid,
            # in unshare mode the init stays in the zygote's mount namespace: the driver's root
            root_pid=pid if server.pid_namespaces == "unshare" else init_pid,
            kill=kill,
            cgroup=cgroup,
            fds=fds,
            reader=reader,
            exit_status=lambda timeout_s: exit_pair(server.wait_exit(pid, timeout_s).status),
            running=lambda: server.running(pid),
            release=release,
            watch_memory=self._watch_memory,
        )

    def _create_bwrap(self, spec: SandboxSpec) -> Sandbox:
        with contextlib.ExitStack() as stack:
            sandbox_id, uid, cgroup, fds, extra = self._allocate(stack, spec)
            fds["info"], fds["info_w"] = os.pipe()  # bwrap tells the init's pid
            fds["block_r"], fds["block"] = os.pipe()  # bwrap waits until it is in its cgroup
            fds["seccomp"] = os.memfd_create("execbox-seccomp")
            os.write(fds["seccomp"], filter_bpf(spec.egress is not None))
            os.lseek(fds["seccomp"], 0, os.SEEK_SET)
            argv = self._bwrap_argv(spec, fds, uid, extra)
            try:
                process = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=fds["stdout_w"],
                    stderr=fds["stderr_w"],
                    pass_fds=(fds["seccomp"], fds["info_w"], fds["block_r"], fds["control_r"], fds["events_w"], fds["args"]),
                    env={},
                    start_new_session=True,
                )
            except OSError as exc:
                raise SandboxStartError(f"cannot start bwrap for sandbox {sandbox_id}: {exc}") from exc
            stack.callback(kill_process, process)
            for name in ("control_r", "events_w", "stdout_w", "stderr_w", "info_w", "block_r", "seccomp", "args"):
                os.close(fds.pop(name))
            init_pid = self._read_child_pid(fds["info"], process, sandbox_id)
            fds["init_pidfd"] = init_pidfd = os.pidfd_open(init_pid)

            def exit_status(timeout_s: float) -> tuple[int | None, int | None]:
                try:
                    status = process.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired as exc:
                    raise TimeoutError(f"sandbox {sandbox_id} still running") from exc
                # bwrap exits with the program's status, or 128 + the signal that ended it
                return (None, status - 128) if status > 128 else (status, None)

            cgroup.attach(init_pid)
            os.write(fds["block"], b"1")
            os.close(fds.pop("block"))
            reader = await_ready(fds, spec, sandbox_id)
            release = stack.pop_all()
        return NamespacesSandbox(
            spec,
            sandbox_id,
            init_pid=init_pid,
            root_pid=init_pid,
            kill=lambda: kill_pidfd(init_pidfd),
            cgroup=cgroup,
            fds=fds,
            reader=reader,
            exit_status=exit_status,
            running=lambda: process.poll() is None,
            release=release,
            watch_memory=self._watch_memory,
        )

    @staticmethod
    def _read_child_pid(info_fd: int, process: subprocess.Popen[bytes], sandbox_id: str) -> int:
        data = b""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            chunk = os.read(info_fd, 4096)
            if not chunk:
                break
            data += chunk
            with contextlib.suppress(ValueError):
                return int(json.loads(data)["child-pid"])
        process.poll()
        raise SandboxStartError(f"bwrap of sandbox {sandbox_id} gave no child pid (exit {process.returncode})")

    def describe(self) -> dict[str, Any]:
        found = {"launcher": "fork server" if self._use_forkserver else "bwrap"}
        if self._pid_namespaces:
            found["pid_namespaces"] = self._pid_namespaces  # the zygote's mode (unshare: gVisor)
        if self._watch_memory:
            found["memory_limit"] = f"watched every {WATCH_INTERVAL_S * 1000:g} ms (the cgroups do not enforce it)"
        return found

    def reap(self) -> int:
        return self._cgroups.reap()

    def close(self) -> None:
        with self._lock:
            servers, self._forkservers = list(self._forkservers.values()), {}
            views, self._views = list(self._views.values()), {}
        for server in servers:
            server.close()
        for fd in views:
            os.close(fd)
        self._cgroups.close()
