"""``unisolated-test``: the real language drivers as plain child processes. NOT A SANDBOX.

For tests only: it lets the HTTP contract, the executor and the drivers' protocol run
in-process without root (as httpx's ``MockTransport`` lets a client run without a
network). A program run here has the service's own user, files, network and kernel; no
namespace, cgroup, seccomp filter or memory limit applies. The wall-time limit, the output
cap, the report token and every verdict are the real ones: the run goes through
:class:`~execbox.isolation.supervise.SupervisedSandbox`, the code every backend shares.

It is never chosen by ``SANDBOX_BACKEND`` (``auto`` only tries the backends of
``execbox.service.backends.BACKEND_NAMES``) and refuses to be built unless the caller
says, in code, that it knows: ``UnisolatedTestBackend(i_know_this_is_not_isolated=True)``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, ClassVar

from execbox.errors import ConfigurationError, SandboxError, SandboxStartError
from execbox.isolation.base import IsolationBackend, Sandbox, SandboxSpec
from execbox.isolation.cgroups import Cgroup
from execbox.isolation.hostproc import close_all, driver_pipes, kill_process
from execbox.isolation.owners import sandbox_name
from execbox.isolation.protocol import FrameReader
from execbox.isolation.supervise import SupervisedSandbox, await_ready
from execbox.runtimes import CONTROL_FD_ENV, DRIVER_MOUNT, EVENTS_FD_ENV, RUNTIME_MOUNT

__all__ = ["UNISOLATED_TEST_BACKEND", "UnisolatedTestBackend", "UnisolatedTestSandbox"]

UNISOLATED_TEST_BACKEND = "unisolated-test"


class _NoCgroup(Cgroup):
    """Stands where a cgroup would be: limits nothing, measures nothing."""

    def attach(self, pid: int) -> None:
        pass

    def set_memory_limit(self, memory_bytes: int) -> None:
        pass

    def oom_kills(self) -> int:
        return 0

    def memory_peak_bytes(self) -> int | None:
        return None

    def memory_usage_bytes(self) -> int | None:
        return None

    def cpu_time_ms(self) -> float | None:
        return None

    def pids(self) -> list[int]:
        return []

    def _dirs(self) -> list[Path]:
        return []


class UnisolatedTestSandbox(SupervisedSandbox):
    """One driver in a child process of its own session, in a temporary directory."""

    backend_name: ClassVar[str] = UNISOLATED_TEST_BACKEND

    def __init__(self, spec: SandboxSpec, sandbox_id: str, *, process: subprocess.Popen[bytes], workspace: Path,
                 fds: dict[str, int], reader: FrameReader, release: contextlib.ExitStack) -> None:
        super().__init__(spec, sandbox_id, cgroup=_NoCgroup(sandbox_id), fds=fds, reader=reader, release=release)
        self._process = process
        self._workspace = workspace

    def _kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._process.pid, signal.SIGKILL)  # its session: the driver and its children

    def _exit_status(self, timeout_s: float) -> tuple[int | None, int | None]:
        try:
            status = self._process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            raise TimeoutError(f"sandbox {self.id} still running") from exc
        return (None, -status) if status < 0 else (status, None)

    def _running(self) -> bool:
        return self._process.poll() is None

    def _host_threads(self) -> list[int]:
        return []

    def open_workspace(self) -> int:
        if not self._running():
            raise SandboxError(f"sandbox {self.id} has ended; its workspace is gone")
        return os.open(self._workspace, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)


class UnisolatedTestBackend(IsolationBackend):
    """Builds :class:`UnisolatedTestSandbox` es; see the module docstring (tests only)."""

    name: ClassVar[str] = UNISOLATED_TEST_BACKEND

    def __init__(self, *, i_know_this_is_not_isolated: bool = False, python: str | None = None) -> None:
        if i_know_this_is_not_isolated is not True:
            raise ConfigurationError(
                f"the {UNISOLATED_TEST_BACKEND} backend isolates nothing and exists for tests only; "
                "build it with UnisolatedTestBackend(i_know_this_is_not_isolated=True) in a test"
            )
        #: the Python interpreter when the runtime environment has none (default: this one)
        self._python = python or sys.executable

    def check(self) -> None:
        pass

    def reap(self) -> int:
        return 0

    def describe(self) -> dict[str, Any]:
        return {"isolation": "none: a test backend, programs run as plain child processes"}

    def _argv(self, spec: SandboxSpec) -> list[str]:
        argv = [a.replace(f"{DRIVER_MOUNT}/{spec.runtime.driver_path.name}", str(spec.runtime.driver_path))
                for a in spec.runtime.argv()]
        argv = [a.replace(RUNTIME_MOUNT, str(spec.runtime_env_dir)) for a in argv]
        if spec.runtime.driver_in_process and not Path(argv[0]).is_file():
            argv[0] = self._python  # no built environment: the driver needs only the standard library
        return argv

    def create(self, spec: SandboxSpec) -> Sandbox:
        sandbox_id = sandbox_name("unisolated")
        with contextlib.ExitStack() as stack:
            root = Path(tempfile.mkdtemp(prefix=f"execbox-{sandbox_id}-"))
            stack.callback(shutil.rmtree, root, ignore_errors=True)
            workspace, tmp = root / "workspace", root / "tmp"
            workspace.mkdir()
            tmp.mkdir()
            fds: dict[str, int] = {}
            stack.callback(close_all, fds)
            driver_pipes(fds)
            env = {key: value.replace(RUNTIME_MOUNT, str(spec.runtime_env_dir)) for key, value in spec.env.items()}
            env = {key: str(tmp) + value[4:] if value == "/tmp" or value.startswith("/tmp/") else value
                   for key, value in env.items()}
            env[CONTROL_FD_ENV], env[EVENTS_FD_ENV] = str(fds["control_r"]), str(fds["events_w"])
            try:
                process = subprocess.Popen(
                    self._argv(spec), cwd=workspace, env=env, stdin=subprocess.DEVNULL, stdout=fds["stdout_w"],
                    stderr=fds["stderr_w"], pass_fds=(fds["control_r"], fds["events_w"]), start_new_session=True,
                )
            except OSError as exc:
                raise SandboxStartError(f"cannot start the {spec.runtime.name} driver: {exc}") from exc
            stack.callback(kill_process, process)
            stack.callback(lambda: _kill_session(process))
            for end in ("control_r", "events_w", "stdout_w", "stderr_w"):
                os.close(fds.pop(end))
            reader = await_ready(fds, spec, sandbox_id)
            release = stack.pop_all()
        return UnisolatedTestSandbox(
            spec, sandbox_id, process=process, workspace=workspace, fds=fds, reader=reader, release=release
        )


def _kill_session(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL what the driver left in its session (a program's children)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
