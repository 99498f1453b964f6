"""Host side of the fork server (the zygote in ``isolation/zygote.py``).

One zygote per sandbox spec, started by a *launcher*: directly on the host (the
``namespaces`` backend) or as the first process of a long-lived gVisor sandbox (the
``gvisor`` backend's two walls). Either way this object sends the zygote its
configuration, asks it for sandboxes (passing each one's four channel fds over
SCM_RIGHTS on the host; inside gVisor the channels are those the sandbox was started
with), kills them, asks it to export artifacts (gVisor) and collects the drivers' wait
statuses and usage. The sandboxes it yields are ``NamespacesSandbox`` (host) and
``GVisorExecution`` (gVisor).
"""

from __future__ import annotations

import base64
import contextlib
import errno
import json
import logging
import os
import socket
import subprocess
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from execbox.errors import SandboxError, SandboxStartError
from execbox.isolation.hostproc import close_all, kill_pidfd, read_available
from execbox.isolation.rootfs import Op, PlanStep, guest_plan, system_steps
from execbox.isolation.seccomp import syscall_number
from execbox.runtimes import WORKSPACE

__all__ = [
    "VIEW_ZYGOTE", "ZYGOTE", "DriverExit", "ForkServer", "Launcher", "exit_pair", "host_view",
    "probe_plan", "zygote_launcher",
]  # fmt: skip

log = logging.getLogger("execbox.forkserver")

#: the in-sandbox program (stdlib only), shipped inside the package
ZYGOTE = Path(__file__).resolve().parent / "zygote.py"
#: starts the zygote given the fd of its end of the socket; returns its process
Launcher = Callable[[int], "subprocess.Popen[bytes]"]


def probe_plan() -> list[PlanStep]:
    """The file system of a start-up check's sandbox (see ``ForkServer.probe``): the host's
    programs, as every plan has them, a /proc, a /dev and a small workspace."""
    return [*system_steps(), PlanStep(Op.PROC, "/proc"), PlanStep(Op.DEV, "/dev"), PlanStep.tmpfs(WORKSPACE, 1 << 20)]


#: where a host zygote finds itself, and builds its sandboxes' roots, inside its view
VIEW_ZYGOTE = "/opt/zygote/zygote.py"
_VIEW_SANDBOX_ROOT = "/sandbox"


def host_view(
    plan: Sequence[PlanStep], host_root: Path, interpreter: str, host_dirs: Sequence[str] = ()
) -> tuple[dict[str, Any], list[PlanStep]]:
    """What a zygote on the host sees (see ``_enter_view`` in isolation/zygote.py): every
    read-only bind of ``plan`` at its target (a host directory as an overlay of its own, a
    file copied), the plan's links, and read-write the host's ``/dev``, ``/proc``, cgroup
    tree and ``host_dirs`` (each at its own path: the egress sockets' directory). Returns
    the view (with the interpreter, at its path inside, that starts the zygote again
    there, and the directory its sandboxes' roots are built in: ``sandbox_root``) and the
    plan the sandboxes are built from (each bind from its target, as inside gVisor)."""
    steps: list[tuple[str, str, str]] = []
    for step in plan:
        if step.op is Op.SYMLINK:
            steps.append(("symlink", step.source, step.target))
        elif step.op is Op.RO_BIND:
            steps.append(("overlay" if Path(step.source).is_dir() else "copy", step.source, step.target))
        elif step.op is Op.BIND:
            steps.append(("rbind", step.source, step.target))
    steps.append(("copy", str(ZYGOTE), VIEW_ZYGOTE))
    for path in ("/dev", "/proc", "/sys/fs/cgroup", *host_dirs):
        if Path(path).is_dir():
            steps.append(("rbind", path, path))
    view = {"root": str(host_root), "steps": steps, "sandbox_root": _VIEW_SANDBOX_ROOT,
            "exec": [interpreter, "-I", "-B", VIEW_ZYGOTE]}  # fmt: skip
    return view, guest_plan(plan)


@dataclass(frozen=True)
class DriverExit:
    """How one driver ended: its raw wait status and what it used."""

    status: int
    maxrss_kb: int | None = None
    cpu_ms: float | None = None


class ForkServer:
    """A running zygote: ``spawn`` sandboxes, ``kill`` them, ``wait_exit`` for them, ``close``."""

    def __init__(
        self,
        launch: Launcher,
        *,
        root_dir: str,
        plan: Sequence[PlanStep],
        seccomp_bpf: bytes,
        env: Mapping[str, str],
        loopback: bool,
        preload: str,
        driver: str | None,
        exec_argv: Sequence[str] | None = None,
        nice: int = 0,
        channel: Sequence[int] | None = None,
        export_dir: str | None = None,
        on_exit: Callable[[int], None] | None = None,
        view: Mapping[str, Any] | None = None,
    ) -> None:
        self._launch = launch
        self._on_exit = on_exit
        self._config: dict[str, Any] = {
            "op": "init",
            "root": root_dir,
            "plan": [step.wire() for step in plan],
            "filter": base64.b64encode(seccomp_bpf).decode(),
            "env": dict(env),
            "loopback": loopback,
            "preload": preload,
            "driver": driver,
            "exec": list(exec_argv) if exec_argv else None,
            "nice": nice,
            "channel": list(channel) if channel else None,
            "export": export_dir,
            "syscalls": {name: syscall_number(name) for name in ("clone", "pivot_root", "prctl")},
            "title": "sandbox-init",
            "view": dict(view) if view else None,
        }
        self._sock: socket.socket | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self._send_lock = threading.Lock()
        self._state = threading.Condition()
        self._replies: dict[str, Future[dict[str, Any]]] = {}
        self._exits: dict[int, DriverExit] = {}
        self._alive = False
        self._closing = False
        #: how the zygote puts sandboxes into PID namespaces: "setns", or "unshare" where
        #: the kernel (gVisor's) has no setns for them (see isolation/zygote.py)
        self.pid_namespaces = ""

    @property
    def alive(self) -> bool:
        return self._alive and self.process is not None and self.process.poll() is None

    def start(self, timeout_s: float = 120.0) -> None:
        """Start the zygote and wait until its modules are imported."""
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.process = self._launch(child.fileno())
        except OSError as exc:
            parent.close()
            raise SandboxStartError(f"cannot start the fork server: {exc}") from exc
        finally:
            child.close()
        try:
            parent.send(json.dumps(self._config).encode())
            parent.settimeout(timeout_s)
            reply = json.loads(parent.recv(65536) or b"{}")
            if reply.get("op") != "ready":
                said = f": {reply['message']}" if reply.get("message") else ""
                raise SandboxStartError(f"the fork server did not start{said} (exit {self.process.poll()})")
            self.pid_namespaces = str(reply.get("pidns", ""))
            parent.settimeout(None)
        except (OSError, ValueError, SandboxStartError) as exc:
            parent.close()
            with contextlib.suppress(OSError):
                self.process.kill()
            self.process.wait()
            if isinstance(exc, SandboxStartError):
                raise
            raise SandboxStartError(f"the fork server did not start: {exc}") from exc
        self._sock = parent
        self._alive = True
        threading.Thread(target=self._read_loop, name="execbox-forkserver", daemon=True).start()

    def _read_loop(self) -> None:
        assert self._sock is not None
        while True:
            try:
                data = self._sock.recv(65536)
            except OSError:
                data = b""
            if not data:
                break
            try:
                self._dispatch(json.loads(data))
            except (ValueError, KeyError, TypeError) as exc:  # one bad datagram must not end the reader
                log.error("fork server sent a malformed message (%s): %r", exc, data[:200])
        with self._state:
            self._alive = False
            for future in self._replies.values():
                future.set_exception(SandboxStartError("the fork server exited"))
            self._replies.clear()
            self._state.notify_all()
        if not self._closing:
            log.warning("the fork server exited (status %s)", self.process.poll() if self.process else None)

    def _dispatch(self, message: dict[str, Any]) -> None:
        with self._state:
            if message["op"] == "exit":
                cpu = message.get("cpu_ms")
                self._exits[int(message["pid"])] = DriverExit(
                    int(message["status"]), message.get("maxrss_kb"), float(cpu) if cpu is not None else None
                )
                self._state.notify_all()
            else:
                future = self._replies.pop(str(message["id"]), None)
        if message["op"] == "exit":
            if self._on_exit is not None:
                self._on_exit(int(message["pid"]))
            return
        if future is None:
            return
        if message["op"] == "error":
            future.set_exception(SandboxError(f"fork server: {message.get('message')}"))
        else:
            future.set_result(message)

    def _ask(self, request: dict[str, Any], fds: Sequence[int] = (), timeout_s: float = 30.0) -> dict[str, Any]:
        if not self.alive or self._sock is None:
            raise SandboxStartError("the fork server is not running")
        key = str(request["id"])
        future: Future[dict[str, Any]] = Future()
        with self._state:
            self._replies[key] = future
        try:
            with self._send_lock:
                socket.send_fds(self._sock, [json.dumps(request).encode()], list(fds))
            return future.result(timeout=timeout_s)
        except (OSError, TimeoutError) as exc:
            raise SandboxError(f"fork server {request['op']} of {key} failed: {exc or 'timed out'}") from exc
        finally:
            with self._state:
                self._replies.pop(key, None)

    def spawn(
        self,
        sandbox_id: str,
        uid: int,
        cgroup_procs: list[str],
        rlimits: dict[str, int],
        fds: Sequence[int] = (),
        plan: Sequence[PlanStep] = (),
    ) -> tuple[int, int]:
        """One isolated sandbox: returns the pids (in the zygote's namespace) of its driver
        (which says ready on its events channel; ``wait_exit`` gives its status) and of its
        init (pid 1 of its namespaces). ``plan``: mount steps of this sandbox only (after
        the spec's)."""
        request = {"op": "spawn", "id": sandbox_id, "uid": uid, "cgroups": cgroup_procs, "rlimits": rlimits}
        if plan:
            request["plan"] = [step.wire() for step in plan]
        try:
            reply = self._ask(request, fds)
        except SandboxError as exc:
            raise SandboxStartError(str(exc)) from exc
        return int(reply["pid"]), int(reply["init"])

    def probe(self, sandbox_id: str, uid: int, cgroup_procs: list[str], timeout_s: float = 30.0) -> str:
        """Build one sandbox, whose program (``exec_argv``) must exit 0, and end it: the
        start-up check. Returns "" or why it failed (what it said on stderr)."""
        fds: dict[str, int] = {}
        try:
            for name in ("control", "events", "stdout", "stderr"):
                fds[f"{name}_r"], fds[f"{name}_w"] = os.pipe()
            ends = [fds.pop("control_r"), fds.pop("events_w"), fds.pop("stdout_w"), fds.pop("stderr_w")]
            try:
                pid, init_pid = self.spawn(sandbox_id, uid, cgroup_procs, {"core": 0}, ends)
            finally:
                for fd in ends:
                    os.close(fd)
            status = self.wait_exit(pid, timeout_s).status
            self.kill(sandbox_id, pid, init_pid, uid)
            self.forget(pid)
            return "" if status == 0 else read_available(fds["stderr_r"]) or f"wait status {status}"
        finally:
            close_all(fds)

    def init_killer(self, fds: dict[str, int], sandbox_id: str, pid: int, init_pid: int, uid: int) -> Callable[[], None]:
        """What SIGKILLs a sandbox's init, whose death ends its namespaces: a pidfd (kept in
        ``fds``, race-free) or, where the kernel has none (gVisor), the zygote, whose own
        child (or its factory's) the init is, so that its pid cannot have been reused."""
        try:
            fds["init_pidfd"] = pidfd = os.pidfd_open(init_pid)
        except OSError as exc:
            if exc.errno != errno.ENOSYS:
                raise SandboxStartError(f"sandbox {sandbox_id}: its init is gone ({exc})") from exc

            def through_zygote() -> None:
                self.kill(sandbox_id, pid, init_pid, uid)  # unconfirmed: the cgroup's removal kills the rest

            return through_zygote
        return lambda: kill_pidfd(pidfd)

    def kill(self, sandbox_id: str, pid: int, init_pid: int, uid: int, timeout_s: float = 10.0) -> bool:
        """SIGKILL a sandbox's driver and init; True once the init is reaped (nothing of the
        sandbox is left), False when the zygote could not confirm it."""
        request = {"op": "kill", "id": sandbox_id, "pid": pid, "init": init_pid, "uid": uid}
        try:
            reply = self._ask(request, timeout_s=timeout_s)
        except SandboxError:
            return False
        return bool(reply.get("confirmed"))

    def collect(self, sandbox_id: str, pid: int, timeout_s: float = 40.0) -> tuple[int, int]:
        """Have the zygote copy the artifacts of the sandbox whose driver is ``pid`` into its
        export directory (gVisor); returns how many files it copied and the driver's peak
        resident memory in bytes (VmHWM; inside gVisor VmRSS, a lower bound)."""
        reply = self._ask({"op": "collect", "id": sandbox_id, "pid": pid}, timeout_s=timeout_s)
        return int(reply["count"]), int(reply.get("hwm_kb") or 0) * 1024

    def running(self, pid: int) -> bool:
        with self._state:
            return self._alive and pid not in self._exits

    def wait_exit(self, pid: int, timeout_s: float) -> DriverExit:
        """How the driver ended; TimeoutError if it is still running."""
        with self._state:
            if not self._state.wait_for(lambda: pid in self._exits or not self._alive, timeout_s):
                raise TimeoutError(f"child {pid} still running")
            return self._exits.get(pid, DriverExit(9))  # zygote gone: its children were SIGKILLed

    def forget(self, pid: int) -> None:
        with self._state:
            self._exits.pop(pid, None)

    def expect_exit(self) -> None:
        """The zygote is about to be ended from outside (its gVisor sandbox killed): its
        exit is no surprise, and not logged as one."""
        self._closing = True

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the zygote; it SIGKILLs any child still running."""
        self._closing = True
        self._alive = False
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
        if self.process is not None:
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def zygote_launcher(interpreter: Path, env: Mapping[str, str]) -> Launcher:
    """Starts a zygote on the host, run by ``interpreter`` with environment ``env``."""

    def launch(sock_fd: int) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [str(interpreter), "-I", "-B", str(ZYGOTE)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            pass_fds=(sock_fd,),
            env={**env, "EXECBOX_ZYGOTE_FD": str(sock_fd)},
            start_new_session=True,
        )

    return launch


def exit_pair(status: int) -> tuple[int | None, int | None]:
    """A driver's raw wait status as ``(exit_code, None)`` or ``(None, signal)``."""
    if os.WIFSIGNALED(status):
        return None, os.WTERMSIG(status)
    return os.WEXITSTATUS(status), None
