"""The gVisor backend's two walls: one long-lived gVisor sandbox, many fresh inner sandboxes.

A :class:`GVisorHost` is one gVisor sandbox (``runsc run`` of an OCI bundle, see
:func:`execbox.isolation.oci.build_host_config`) whose first process is the fork server
(:mod:`execbox.isolation.zygote`), root inside gVisor only. It serves executions one at a
time; each :class:`GVisorExecution` is an inner sandbox the zygote prepared ahead of the
request, exactly as on the host: fresh mount, PID, IPC, UTS and network namespaces, fresh
size-capped tmpfs workspace, /tmp and /dev/shm, a per-execution uid, no capabilities,
no_new_privs, the built-in seccomp filter and rlimits; the Python driver is already
imported (with the preloaded modules), Node's driver is already started.

Egress (``spec.egress``): each gVisor sandbox gets its own proxy socket, its directory
bound at ``EGRESS_DIR`` and bound again into every inner sandbox; runsc runs with
``--host-uds=open``, which lets the sentry connect to that host socket (it creates none).
Its executions use it one at a time, so the proxy knows whose connection it is.

Channels: runsc passes host fds into the sandbox (``--pass-fd``): the zygote's socket
(fd 3) and the four channels of *the* execution being served (control, events, stdout,
stderr at fds 4-7), which every inner sandbox of this host uses in turn. That is safe
because there is never more than one: the next one is spawned only after the zygote has
reaped the previous one's init (so no process of it is left holding a channel) and
drained the control channel; the host drains the other three and starts a fresh frame
reader. Artifacts are copied by the zygote, without following symlinks, into a host tmpfs
bound at ``/run/export`` (never visible to inner sandboxes), where the host applies its
usual rules.

Memory: the host cgroup of the gVisor sandbox is the backstop. At each run its limit
becomes what the sandbox uses now plus the execution's memory and a margin for the
sentry, so an execution that exceeds its memory is OOM-killed with the whole gVisor
sandbox (verdict -137) and nothing else. Peak and CPU are the cgroup's, measured from the
start of the execution.

Recycling: a host serves at most ``executions_max`` executions and lives at most
``lifetime_s``; it is replaced at once after an execution that was OOM-killed, killed by
a signal (SIGSYS included) or timed out, or whose cleanup the zygote could not confirm.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from execbox.errors import SandboxError, SandboxStartError
from execbox.isolation.base import SandboxSpec
from execbox.isolation.cgroups import Cgroup, CgroupManager
from execbox.isolation.forkserver import ZYGOTE, ForkServer, exit_pair
from execbox.isolation.hostproc import close_all, driver_pipes, kill_pidfd, kill_process, mount_tmpfs, remove_workspace
from execbox.isolation.oci import EXPORT_DIR, ZYGOTE_DIR, build_host_config, make_mount_points
from execbox.isolation.owners import sandbox_name
from execbox.isolation.protocol import FrameReader
from execbox.isolation.rootfs import PlanStep, egress_step, guest_plan
from execbox.isolation.supervise import SupervisedSandbox, wait_ready
from execbox.models import Limits
from execbox.runtimes import DRIVER_MOUNT, RUNTIME_MOUNT, SYSTEM_PYTHON

__all__ = ["FORK_SERVER_MEMORY_BYTES", "SENTRY_MEMORY_BYTES", "GVisorExecution", "GVisorHost", "HostLayout"]

log = logging.getLogger("execbox.gvisor")

#: memory allowed on top of an execution's limit for the sentry, gofer and platform stubs
SENTRY_MEMORY_BYTES = 32 << 20
#: memory a long-lived gVisor sandbox may take while it starts and holds its fork server
#: (Python with pandas preloaded), before an execution's own limit applies
FORK_SERVER_MEMORY_BYTES = 768 << 20
#: guest fd numbers of the zygote's socket and of the execution channels
_GUEST_SOCKET_FD = 3
_GUEST_CHANNEL_FDS = (4, 5, 6, 7)
_ARTIFACTS = "artifacts"


@dataclass(frozen=True)
class HostLayout:
    """What every host of one backend shares: runsc's argv, directories, skeleton, binds."""

    runsc_argv: Callable[..., list[str]]
    delete_state: Callable[[str], None]
    bundles: Path
    work: Path
    rootfs: Path
    cgroups: CgroupManager
    uid_base: int
    uid_count: int
    pids_backstop: int
    sentry_memory_bytes: int


class GVisorHost:
    """One long-lived gVisor sandbox with the fork server inside; see the module docstring."""

    def __init__(self, layout: HostLayout, spec: SandboxSpec, plan: Sequence[PlanStep], bpf: bytes) -> None:
        self.spec = spec
        self.id = sandbox_name("gvh")
        self.executions = 0
        self.started_at = time.monotonic()
        self.tainted = False
        self.idle_since = self.started_at
        self._layout = layout
        self._plan = list(plan)
        self._bpf = bpf
        self._fds: dict[str, int] = {}
        self._stack = contextlib.ExitStack()
        self._server: ForkServer | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self.cgroup: Cgroup | None = None
        self._bundle = layout.bundles / self.id
        self.export = layout.work / self.id
        self._busy = False
        self._current: GVisorExecution | None = None
        self._lock = threading.Lock()

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        """Start the gVisor sandbox and its zygote; undone completely on failure."""
        spec, layout = self.spec, self._layout
        with self._stack as stack:
            self._bundle.mkdir()
            stack.callback(shutil.rmtree, self._bundle, True)
            self.export.mkdir()
            stack.callback(remove_workspace, self.export)
            mount_tmpfs(self.export, spec.workspace_bytes, 0)
            (self.export / _ARTIFACTS).mkdir()
            limit = spec.memory_bytes + layout.sentry_memory_bytes + FORK_SERVER_MEMORY_BYTES
            self.cgroup = layout.cgroups.create(self.id, limit, layout.pids_backstop, spec.cpus)
            stack.callback(self.cgroup.remove)
            fds = self._fds
            stack.callback(close_all, fds)
            driver_pipes(fds)
            fds["exited"], fds["exited_w"] = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            if spec.egress is not None:
                self._plan.append(egress_step(spec.egress.open(self.id)))
                stack.callback(spec.egress.close, self.id)
            make_mount_points(layout.rootfs, self._plan)
            runtime = spec.runtime
            interpreter = f"{RUNTIME_MOUNT}/bin/python3" if runtime.driver_in_process else SYSTEM_PYTHON
            env = {**spec.env, "EXECBOX_ZYGOTE_FD": str(_GUEST_SOCKET_FD)}
            config = build_host_config(
                spec, plan=self._plan, rootfs=layout.rootfs, zygote=ZYGOTE, export_dir=self.export,
                argv=[interpreter, "-I", "-B", f"{ZYGOTE_DIR}/zygote.py"], env=env,
                cgroups_path=f"/{layout.cgroups.parent}/{self.id}", memory_limit_bytes=limit,
                pids_limit=layout.pids_backstop,
            )  # fmt: skip
            (self._bundle / "config.json").write_text(json.dumps(config))
            stack.callback(layout.delete_state, self.id)
            self._server = ForkServer(
                self._launch,
                root_dir="/tmp",
                plan=guest_plan(self._plan),
                seccomp_bpf=self._bpf,
                env=spec.env,
                loopback=spec.egress is not None,
                preload=",".join(spec.preload_modules),
                driver=f"{DRIVER_MOUNT}/{runtime.driver_path.name}" if runtime.driver_in_process else None,
                exec_argv=None if runtime.driver_in_process else runtime.argv(),
                nice=0,
                channel=_GUEST_CHANNEL_FDS,
                export_dir=f"{EXPORT_DIR}/{_ARTIFACTS}",
                on_exit=self._driver_exited,
            )
            try:
                self._server.start(timeout_s=max(spec.startup_timeout_s, 60.0))
            except SandboxStartError as exc:
                raise SandboxStartError(f"gVisor sandbox {self.id} did not start: {exc}; {self._said()}") from exc
            stack.callback(self._server.close, 5.0)
            assert self._process is not None
            stack.callback(kill_process, self._process)
            for name in ("control_r", "events_w", "stdout_w", "stderr_w"):
                os.close(fds.pop(name))
            try:
                fds["sentry_pidfd"] = os.pidfd_open(int((self._bundle / "sandbox.pid").read_text()))
            except (OSError, ValueError) as exc:
                raise SandboxStartError(f"gVisor sandbox {self.id}: no sentry pid ({exc})") from exc
            stack.callback(kill_pidfd, fds["sentry_pidfd"])
            for fd in ("events", "stdout", "stderr"):
                os.set_blocking(fds[fd], False)
            self._stack = stack.pop_all()

    def _driver_exited(self, pid: int) -> None:
        """The zygote reported a driver's end (its channels stay open: the zygote holds them)."""
        current = self._current
        if current is not None and current.pid == pid:
            with contextlib.suppress(OSError):
                os.write(self._fds["exited_w"], b"x")

    def _launch(self, sock_fd: int) -> subprocess.Popen[bytes]:
        fds = self._fds
        passed = [sock_fd, fds["control_r"], fds["events_w"], fds["stdout_w"], fds["stderr_w"]]
        guest = (_GUEST_SOCKET_FD, *_GUEST_CHANNEL_FDS)
        argv = self._layout.runsc_argv(
            *(["--host-uds=open"] if self.spec.egress is not None else []),
            f"--log={self._bundle / 'runsc.log'}", "run", "--bundle", str(self._bundle),
            "--pid-file", str(self._bundle / "sandbox.pid"),
            *(f"--pass-fd={h}:{g}" for h, g in zip(passed, guest, strict=True)), self.id,
        )  # fmt: skip
        argv = ["/usr/bin/nice", f"--adjustment={self.spec.warm_nice}", *argv]
        with open(self._bundle / "zygote.log", "wb") as log_file:
            self._process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file, pass_fds=passed,
                env={}, start_new_session=True,
            )  # fmt: skip
        return self._process

    def _said(self) -> str:
        texts = []
        for name in ("zygote.log", "runsc.log"):
            with contextlib.suppress(OSError):
                texts.append((self._bundle / name).read_text(errors="replace").strip()[-400:])
        return "; ".join(t for t in texts if t) or "runsc said nothing"

    @property
    def alive(self) -> bool:
        return self._server is not None and self._server.alive

    def usable(self, executions_max: int, lifetime_s: float) -> bool:
        """Whether this host may serve another execution."""
        return (
            self.alive
            and not self.tainted
            and self.executions < executions_max
            and time.monotonic() - self.started_at < lifetime_s
        )

    def kill_sentry(self) -> None:
        """SIGKILL the gVisor sandbox (its host resources stay until ``close``)."""
        self.tainted = True
        self._end_sentry()

    def _end_sentry(self) -> None:
        """SIGKILL the sentry, its fork server told first (its exit is then no surprise)."""
        if self._server is not None:
            self._server.expect_exit()
        if "sentry_pidfd" in self._fds:
            kill_pidfd(self._fds["sentry_pidfd"])

    def close(self) -> None:
        """Kill the gVisor sandbox and release everything it holds on the host; idempotent."""
        with self._lock:
            stack, self._stack = self._stack, contextlib.ExitStack()
        self._end_sentry()
        stack.close()

    # -- executions -------------------------------------------------------------------

    def prepare(self) -> GVisorExecution:
        """A fresh inner sandbox, its driver waiting for code (blocking)."""
        assert self._server is not None and self.cgroup is not None
        with self._lock:
            if self._busy:
                raise SandboxError(f"gVisor sandbox {self.id} already serves an execution")
            self._busy = True
        try:
            uid = self._layout.uid_base + self.executions % self._layout.uid_count
            self.executions += 1
            execution_id = f"{self.id}.{self.executions}"
            spec = self.spec
            # gVisor does not count a process's first thread against RLIMIT_NPROC as Linux does:
            # one less keeps "processes + threads <= SANDBOX_MAX_PIDS" the same on both
            nproc = max(1, spec.pids_max - 1)
            rlimits = {"nproc": nproc, "core": 0, "fsize": spec.file_size_max_bytes, "nofile": spec.open_files_max}
            self._drain_channels()  # before the spawn: the new driver's "ready" must not be lost
            pid, init_pid = self._server.spawn(execution_id, uid, [], rlimits)
            execution = GVisorExecution(self, execution_id, pid, init_pid, uid)
            self._current = execution
            if not self.server.running(pid):
                self._driver_exited(pid)
            try:
                wait_ready(self._fds["events"], spec.startup_timeout_s, execution.reader)
                # once now, while the sandbox waits: the first look of the sentry at the new
                # sandbox's /proc entries, mount namespace and workspace, and the zygote's
                # first writes since the fork (copy-on-write), cost more than the whole round
                # trip after the run then does (measured: ~5-7 ms against ~2.5 ms)
                self._server.collect(execution_id, pid)
            except SandboxError as exc:
                self.finish(execution, tainted=True)
                raise SandboxStartError(f"inner sandbox {execution_id} did not start: {exc}") from exc
            execution.waiting()
            return execution
        except BaseException:
            with self._lock:
                self._busy = False
            raise

    @property
    def server(self) -> ForkServer:
        assert self._server is not None
        return self._server

    @property
    def fds(self) -> dict[str, int]:
        return self._fds

    def _drain_channels(self) -> None:
        """Discard whatever the host ends of the shared channels still hold (nothing of one
        execution may reach the next); the fds may already be closed with the host."""
        for name in ("events", "stdout", "stderr", "exited"):
            with contextlib.suppress(OSError, KeyError):
                while os.read(self._fds[name], 1 << 16):
                    pass

    def kill_inner(self, execution: GVisorExecution) -> bool:
        """End one inner sandbox; True once the zygote confirmed nothing of it is left."""
        if not self.alive:
            return False
        return self.server.kill(execution.id, execution.pid, execution.init_pid, execution.uid)

    def finish(self, execution: GVisorExecution, tainted: bool = False) -> None:
        """After an execution: its inner sandbox is gone, the channels are clean, or the
        host is tainted (and will be closed by its owner)."""
        confirmed = self.kill_inner(execution)
        if confirmed:
            with contextlib.suppress(TimeoutError):
                self.server.wait_exit(execution.pid, 5.0)
        self.server.forget(execution.pid)
        self._current = None
        self._drain_channels()
        with self._lock:
            self.tainted = self.tainted or tainted or not confirmed
            self._busy = False


class GVisorExecution(SupervisedSandbox):
    """One inner sandbox of a :class:`GVisorHost`: one execution, then gone."""

    backend_name = "gvisor"

    def __init__(self, host: GVisorHost, execution_id: str, pid: int, init_pid: int, uid: int) -> None:
        assert host.cgroup is not None
        channels = {name: host.fds[name] for name in ("control", "events", "stdout", "stderr")}
        super().__init__(
            host.spec, execution_id, cgroup=host.cgroup, fds=channels, reader=FrameReader(),
            release=contextlib.ExitStack(),
        )  # fmt: skip
        self.host = host
        #: the host-side sandbox this execution lives in
        self.container_id = host.id
        self.pid = pid
        self.init_pid = init_pid
        self.uid = uid
        self.reader = self._reader
        self._usage_before = 0
        self.misbehaved = False
        self._oom_before = 0
        self._cpu_before: float | None = None
        #: how many artifacts the zygote copied into the host's export directory (None: not yet)
        self._collected: int | None = None
        self.run_done = False
        self.on_run_done: Callable[[GVisorExecution], None] | None = None
        self.on_destroyed: Callable[[GVisorExecution], None] | None = None

    @property
    def egress_key(self) -> str | None:
        """The gVisor sandbox's proxy port, used by its executions one at a time."""
        return self.host.id if self.spec.egress is not None else None

    def _kill(self) -> None:
        if not self.host.kill_inner(self):
            self.host.kill_sentry()  # every process of this sandbox dies with the sentry

    def _running(self) -> bool:
        return self.host.alive and self.host.server.running(self.pid)

    def _exit_status(self, timeout_s: float) -> tuple[int | None, int | None]:
        return exit_pair(self.host.server.wait_exit(self.pid, timeout_s).status)

    def _exited_fd(self) -> int | None:
        return self.host.fds["exited"]

    def _limit_memory(self, limits: Limits) -> None:
        usage = self.cgroup.memory_usage_bytes() or 0
        self.cgroup.set_memory_limit(usage + limits.memory_bytes + SENTRY_MEMORY_BYTES)
        self.cgroup.reset_memory_peak()
        self._oom_before = self.cgroup.oom_kills()
        self._cpu_before = self.cgroup.cpu_time_ms()
        self._usage_before = usage

    def _usage(self) -> tuple[bool, int | None, float | None]:
        oom = self.cgroup.oom_kills() > self._oom_before
        peak = self.cgroup.memory_peak_bytes()
        cpu = self.cgroup.cpu_time_ms()
        # the sentry reuses memory it already holds, so the cgroup's growth can be 0: the
        # driver's own peak resident memory is the lower bound
        grown = max(0, peak - self._usage_before) if peak is not None else 0
        resident = 0
        if self._running():  # the driver reported and waits: its artifacts are ready too
            try:  # one round trip for both (the executor asks for the artifacts next)
                self._collected, resident = self.host.server.collect(self.id, self.pid)
            except SandboxError as exc:
                log.warning("inner sandbox %s: artifacts and peak memory not read: %s", self.id, exc)
        return (
            oom,
            max(grown, resident) or None,
            cpu - self._cpu_before if cpu is not None and self._cpu_before is not None else None,
        )

    def run(self, request, limits, on_output=None):  # type: ignore[no-untyped-def]
        try:
            outcome = super().run(request, limits, on_output)
        finally:
            self.run_done = True
            if self.on_run_done is not None:
                self.on_run_done(self)
        if outcome.oom_killed or outcome.signal is not None or outcome.timed_out or outcome.report is None:
            self.misbehaved = True
        return outcome

    def open_workspace(self) -> int:
        """The host directory the zygote copied this sandbox's artifacts into (at the end of
        the run, see ``_usage``)."""
        if not self._running():
            raise SandboxError(f"sandbox {self.id} has ended; its workspace is gone")
        if self._collected is None:
            self._collected, _ = self.host.server.collect(self.id, self.pid)
        return os.open(self.host.export, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)

    def _teardown(self) -> None:
        try:
            self.host.finish(self, tainted=self.misbehaved)
        finally:
            if self.on_destroyed is not None:
                self.on_destroyed(self)

