"""The gVisor backend's single-use mode: one gVisor sandbox per execution.

Used where the runsc at hand cannot hold two walls, with
``SANDBOX_GVISOR_EXECUTIONS_PER_SANDBOX=1`` and with ``SANDBOX_ENABLE_SECCOMP`` (see
:mod:`execbox.isolation.gvisor`). Each sandbox is an OCI bundle whose first process is
the driver (behind :data:`execbox.isolation.oci.CHANNEL_SHELL`), with a host tmpfs bound
at the workspace; the host reads artifacts from that tmpfs directly.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from execbox.errors import SandboxError, SandboxStartError
from execbox.isolation.base import SandboxSpec
from execbox.isolation.cgroups import Cgroup
from execbox.isolation.gvisor_host import SENTRY_MEMORY_BYTES, HostLayout
from execbox.isolation.hostproc import (
    close_all,
    kill_pidfd,
    kill_process,
    mount_tmpfs,
    read_available,
    remove_workspace,
)
from execbox.isolation.oci import build_config, make_mount_points
from execbox.isolation.owners import sandbox_name
from execbox.isolation.protocol import FrameReader
from execbox.isolation.rootfs import PlanStep, egress_step
from execbox.isolation.supervise import SupervisedSandbox, wait_ready

__all__ = ["GVisorSandbox", "start_single_use"]


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


def start_single_use(
    layout: HostLayout,
    spec: SandboxSpec,
    plan: Sequence[PlanStep],
    *,
    uid: int,
    seccomp: dict[str, Any] | None,
    runsc_flags: Sequence[str],
) -> GVisorSandbox:
    """Start one single-use gVisor sandbox of mount ``plan`` (the spec's), its driver
    waiting (blocking); undone on failure."""
    sandbox_id = sandbox_name("gv")
    bundle, workspace = layout.bundles / sandbox_id, layout.work / sandbox_id
    memory_limit_bytes = spec.memory_bytes + layout.sentry_memory_bytes
    with contextlib.ExitStack() as stack:
        bundle.mkdir()
        stack.callback(shutil.rmtree, bundle, True)
        workspace.mkdir()
        stack.callback(remove_workspace, workspace)
        mount_tmpfs(workspace, spec.workspace_bytes, uid)
        cgroup = layout.cgroups.create(sandbox_id, memory_limit_bytes, layout.pids_backstop, spec.cpus)
        stack.callback(cgroup.remove)
        plan = list(plan)
        if spec.egress is not None:  # its own proxy socket (see EgressPorts), reached with --host-uds=open
            plan.append(egress_step(spec.egress.open(sandbox_id)))
            stack.callback(spec.egress.close, sandbox_id)
            runsc_flags = ["--host-uds=open", *runsc_flags]
        make_mount_points(layout.rootfs, plan)
        config = build_config(
            spec, plan=plan, uid=uid, rootfs=layout.rootfs, workspace_dir=workspace,
            cgroups_path=f"/{layout.cgroups.parent}/{sandbox_id}", memory_limit_bytes=memory_limit_bytes,
            pids_limit=layout.pids_backstop, seccomp=seccomp,
        )  # fmt: skip
        (bundle / "config.json").write_text(json.dumps(config))
        fds: dict[str, int] = {}
        stack.callback(close_all, fds)
        host_end, sandbox_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fds["control"], fds["channel"] = host_end.detach(), sandbox_end.detach()
        fds["events"] = os.dup(fds["control"])  # supervise() wants one fd per direction
        fds["stdout"], fds["stdout_w"] = os.pipe()
        fds["stderr"], fds["stderr_w"] = os.pipe()
        argv = layout.runsc_argv(
            *runsc_flags, f"--log={bundle / 'runsc.log'}", "run",
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
        stack.callback(layout.delete_state, sandbox_id)
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
        reader=reader, workspace_dir=workspace, delete_state=layout.delete_state, release=release,
    )  # fmt: skip


def _what_runsc_said(stderr_fd: int, log_path: Path) -> str:
    """runsc's own complaint on a failed start: its stderr (the sandbox's), else its log."""
    if said := read_available(stderr_fd):
        return said
    with contextlib.suppress(OSError):
        return log_path.read_text(errors="replace").strip()[-400:]
    return ""
