"""Host side of the Python fork server (the zygote in ``runtimes/python/zygote.py``).

One zygote per sandbox spec: a process of the runtime environment's Python with the
preloaded modules imported, which clones one child per sandbox straight into fresh
namespaces; the child isolates itself (cgroup, file system, rlimits, uid, no_new_privs,
seccomp) before it becomes the driver. This object starts the zygote, asks it for
children (passing each child's four channel fds over SCM_RIGHTS) and collects their
wait statuses. It is used by the namespaces backend; the sandbox it yields is the same
``NamespacesSandbox`` that bwrap sandboxes are.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import socket
import subprocess
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from execbox.errors import SandboxStartError

__all__ = ["ForkServer", "exit_pair"]

log = logging.getLogger("execbox.forkserver")


class ForkServer:
    """A running zygote: ``spawn`` children, ``wait_exit`` for them, ``close``."""

    def __init__(
        self,
        python: Path,
        zygote: Path,
        *,
        root_dir: Path,
        plan: Sequence[tuple[str, str, str]],
        seccomp_bpf: bytes,
        env: Mapping[str, str],
        network: bool,
        preload: str,
        nice: int = 0,
    ) -> None:
        self._python = python
        self._zygote = zygote
        self._config: dict[str, Any] = {
            "op": "init",
            "root": str(root_dir),
            "plan": [list(step) for step in plan],
            "filter": base64.b64encode(seccomp_bpf).decode(),
            "env": dict(env),
            "network": network,
            "preload": preload,
            "nice": nice,
        }
        self._sock: socket.socket | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._send_lock = threading.Lock()
        self._state = threading.Condition()
        self._spawns: dict[str, Future[tuple[int, int]]] = {}
        self._exits: dict[int, int] = {}
        self._alive = False
        self._closing = False

    @property
    def alive(self) -> bool:
        return self._alive and self._process is not None and self._process.poll() is None

    def start(self, timeout_s: float = 120.0) -> None:
        """Start the zygote and wait until its modules are imported."""
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._process = subprocess.Popen(
                [str(self._python), "-I", "-B", str(self._zygote)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                pass_fds=(child.fileno(),),
                env={**self._config["env"], "EXECBOX_ZYGOTE_FD": str(child.fileno())},
                start_new_session=True,
            )
        except OSError as exc:
            parent.close()
            raise SandboxStartError(f"cannot start the Python fork server {self._python}: {exc}") from exc
        finally:
            child.close()
        try:
            parent.send(json.dumps(self._config).encode())
            parent.settimeout(timeout_s)
            reply = json.loads(parent.recv(65536) or b"{}")
            if reply.get("op") != "ready":
                raise SandboxStartError(f"the Python fork server did not start (exit {self._process.poll()})")
            parent.settimeout(None)
        except (OSError, ValueError, SandboxStartError) as exc:
            parent.close()
            self._process.kill()
            self._process.wait()
            if isinstance(exc, SandboxStartError):
                raise
            raise SandboxStartError(f"the Python fork server did not start: {exc}") from exc
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
            message = json.loads(data)
            with self._state:
                if message["op"] == "exit":
                    self._exits[message["pid"]] = message["status"]
                    self._state.notify_all()
                    continue
                future = self._spawns.pop(message["id"], None)
            if future is None:
                continue
            if message["op"] == "spawned":
                future.set_result((int(message["pid"]), int(message["init"])))
            else:
                future.set_exception(SandboxStartError(f"fork server: {message.get('message')}"))
        with self._state:
            self._alive = False
            for future in self._spawns.values():
                future.set_exception(SandboxStartError("the Python fork server exited"))
            self._spawns.clear()
            self._state.notify_all()
        if not self._closing:
            log.warning("the Python fork server exited (status %s)", self._process.poll() if self._process else None)

    def spawn(
        self, sandbox_id: str, uid: int, cgroup_procs: list[str], rlimits: dict[str, int], fds: list[int]
    ) -> tuple[int, int]:
        """One isolated sandbox: returns the host pids of its driver (which says ready on its
        events fd; ``wait_exit`` gives its status) and of its init (pid 1 of its namespaces)."""
        if not self.alive or self._sock is None:
            raise SandboxStartError("the Python fork server is not running")
        future: Future[tuple[int, int]] = Future()
        with self._state:
            self._spawns[sandbox_id] = future
        request = {"op": "spawn", "id": sandbox_id, "uid": uid, "cgroups": cgroup_procs, "rlimits": rlimits}
        try:
            with self._send_lock:
                socket.send_fds(self._sock, [json.dumps(request).encode()], fds)
            return future.result(timeout=30)
        except (OSError, TimeoutError) as exc:
            with self._state:
                self._spawns.pop(sandbox_id, None)
            raise SandboxStartError(f"fork server spawn of {sandbox_id} failed: {exc}") from exc

    def running(self, pid: int) -> bool:
        with self._state:
            return self._alive and pid not in self._exits

    def wait_exit(self, pid: int, timeout_s: float) -> int:
        """The child's raw wait status; TimeoutError if it is still running."""
        with self._state:
            if not self._state.wait_for(lambda: pid in self._exits or not self._alive, timeout_s):
                raise TimeoutError(f"child {pid} still running")
            return self._exits.get(pid, 9)  # zygote gone: its children were SIGKILLed

    def forget(self, pid: int) -> None:
        with self._state:
            self._exits.pop(pid, None)

    def close(self) -> None:
        """Stop the zygote; it SIGKILLs any child still running."""
        self._closing = True
        self._alive = False
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
        if self._process is not None:
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()


def exit_pair(status: int) -> tuple[int | None, int | None]:
    """A driver's raw wait status as ``(exit_code, None)`` or ``(None, signal)``."""
    if os.WIFSIGNALED(status):
        return None, os.WTERMSIG(status)
    return os.WEXITSTATUS(status), None
