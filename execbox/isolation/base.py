"""The isolation interface: a backend builds sandboxes from a SandboxSpec.

A :class:`Sandbox` is one isolated, started environment with a driver waiting inside.
It is used for exactly one execution (``run``), or, for a session, for a series of cells
in one interpreter (``run_cell``), then destroyed. A backend *applies* isolation;
it does not decide policy: every capability arrives as a named field of the spec.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

from execbox.models import ExecutionRequest, Limits
from execbox.runtimes import Runtime

__all__ = [
    "DriverReport",
    "EgressPorts",
    "IsolationBackend",
    "Mount",
    "OutputSink",
    "RunOutcome",
    "Sandbox",
    "SandboxSpec",
]

#: receives ("stdout" | "stderr", bytes) as the program prints
OutputSink = Callable[[str, bytes], None]


@dataclass(frozen=True)
class Mount:
    """A host path seen read-only (unless ``writable``) at ``target`` inside the sandbox."""

    source: Path
    target: str
    writable: bool = False


class EgressPorts(abc.ABC):
    """The host side of egress (the service's proxy): one listening UNIX socket per sandbox.

    A backend opens a port for each sandbox it builds (with gVisor's two walls: for each
    long-lived gVisor sandbox, whose executions use it one at a time), shows the directory
    read-only at ``EGRESS_DIR`` inside and closes it when the sandbox is gone. The sandbox's
    ``egress_key`` says which port its connections arrive on."""

    @property
    @abc.abstractmethod
    def directory(self) -> Path:
        """The host directory every directory ``open`` returns is in."""

    @abc.abstractmethod
    def open(self, key: str) -> Path:
        """A fresh host directory holding only a listening socket ``EGRESS_SOCKET_NAME`` for ``key``."""

    @abc.abstractmethod
    def close(self, key: str) -> None:
        """Stop listening for ``key``, end its connections, remove its directory; idempotent."""


@dataclass(frozen=True)
class SandboxSpec:
    """Every isolation capability of one sandbox, each a named field with its unit."""

    runtime: Runtime
    #: host directory with the runtime's built environment, seen at RUNTIME_MOUNT
    runtime_env_dir: Path
    memory_bytes: int
    wall_time_s: float
    pids_max: int
    cpus: float
    workspace_bytes: int
    tmp_bytes: int
    output_bytes: int
    uid: int = 65534
    #: None: no network at all; else each sandbox gets a port of this proxy (see EgressPorts),
    #: a loopback interface and the AF_INET/AF_INET6 sockets to reach it
    egress: EgressPorts | None = None
    #: the built-in syscall filter (namespaces backend) is always on; this is the Docker-format profile
    seccomp_profile: Path | None = None
    open_files_max: int = 256
    file_size_max_bytes: int = 64 << 20
    mounts: tuple[Mount, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    #: nice value while a sandbox is built and waits warm; its program runs at 0 (see Sandbox.run),
    #: so refilling the pool yields the CPU to executions that are running
    warm_nice: int = 10
    #: modules a fork server imports once for all its sandboxes (backends without one ignore it)
    preload_modules: tuple[str, ...] = ()
    startup_timeout_s: float = 30.0
    #: the sandbox is held by one session for its whole life: a backend whose sandboxes share
    #: an outer wall between executions (gVisor two walls) gives it an outer wall of its own,
    #: and its workspace must be reachable from the host while it lives (files API)
    dedicated: bool = False

    @property
    def forks_preloaded(self) -> bool:
        """Whether a fork server would import something for these sandboxes: the driver runs
        in the forked process and there are modules to preload (a backend's ``preloads``
        adds whether it forks them from one)."""
        return self.runtime.driver_in_process and bool(self.preload_modules)

    def without_preloads(self) -> SandboxSpec:
        """The same sandboxes with nothing preloaded: the light pool's (SANDBOX_PYTHON_LIGHT)."""
        return replace(self, preload_modules=())


@dataclass(frozen=True)
class DriverReport:
    """What the driver said when the program finished (absent if it died first)."""

    exit_code: int
    result: dict[str, Any] | None
    error_kind: str | None
    time_ms: float | None


@dataclass(frozen=True)
class RunOutcome:
    """The raw facts of one run, before classification into a verdict."""

    stdout: bytes
    stderr: bytes
    report: DriverReport | None
    #: the process's exit status when it exited by itself, else None
    exit_code: int | None
    #: the signal that ended the program, when one did
    signal: int | None
    timed_out: bool = False
    output_capped: bool = False
    #: the program wrote to the driver's report channel what no driver writes (see supervise)
    report_violation: str | None = None
    oom_killed: bool = False
    wall_time_ms: float = 0.0
    memory_peak_bytes: int | None = None
    cpu_time_ms: float | None = None


class Sandbox(abc.ABC):
    """One started sandbox with a driver waiting inside; used once, then destroyed."""

    backend_name: ClassVar[str]

    def __init__(self, spec: SandboxSpec, sandbox_id: str) -> None:
        self.spec = spec
        self.id = sandbox_id

    @property
    def egress_key(self) -> str | None:
        """The EgressPorts key its connections arrive on (None: it has no egress)."""
        return self.id if self.spec.egress is not None else None

    @abc.abstractmethod
    def run(self, request: ExecutionRequest, limits: Limits, on_output: OutputSink | None = None) -> RunOutcome:
        """Send the request to the driver and wait for the outcome (blocking).

        ``on_output("stdout" | "stderr", data)``, if given, sees the output as it arrives
        (within the output cap), from the calling thread."""

    def run_cell(
        self, request: ExecutionRequest, limits: Limits, timeout_s: float, on_output: OutputSink | None = None
    ) -> RunOutcome:
        """Run one session cell in the sandbox's persistent interpreter (blocking); may be
        called again while ``alive()``. The driver interrupts the cell after ``timeout_s``
        (a report with error_kind ``time``); if it does not stop, the host kills it."""
        raise NotImplementedError(f"{type(self).__name__} does not run session cells")

    @abc.abstractmethod
    def open_workspace(self) -> int:
        """A host-side O_DIRECTORY fd of the live sandbox's working directory (caller closes)."""

    @abc.abstractmethod
    def alive(self) -> bool:
        """Whether the sandbox is still usable (its driver waits for a request)."""

    def abort(self) -> None:
        """Stop a running program at once, from any thread (its run then returns soon); the
        sandbox must still be destroyed."""

    @abc.abstractmethod
    def destroy(self) -> None:
        """Kill everything inside and release every host resource; idempotent."""


class IsolationBackend(abc.ABC):
    """A way to build sandboxes (namespaces, gvisor, ...)."""

    name: ClassVar[str]

    @abc.abstractmethod
    def check(self) -> None:
        """Raise BackendUnavailableError saying why and how to fix it if this host cannot run it."""

    @abc.abstractmethod
    def create(self, spec: SandboxSpec) -> Sandbox:
        """Build and start one sandbox; returns once its driver is ready (blocking)."""

    @abc.abstractmethod
    def reap(self) -> int:
        """Remove what a crashed service left behind; returns how many items were reaped."""

    def describe(self) -> dict[str, Any]:
        """What this backend is and how it runs sandboxes (for /healthz and /v1/info)."""
        return {}

    def preloads(self, spec: SandboxSpec) -> bool:
        """Whether sandboxes of ``spec`` start with ``spec.preload_modules`` imported (forked
        from a fork server that imported them). The executor then keeps a light pool beside
        the spec's pool (SANDBOX_PYTHON_LIGHT); elsewhere a sandbox imports only what its
        code imports, and one pool serves all code."""
        return False

    def close(self) -> None:
        """Release backend-wide resources."""
