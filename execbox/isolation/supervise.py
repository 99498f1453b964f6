"""Drive one run of a started driver: send the request, read output and events under a
deadline and an output cap. Shared by every backend whose driver talks over pipes.

The verdict is the host's: the driver's report runs in the user's process, so it is
believed only when it carries this run's token, has the exact shape (see
``protocol.parse_report``) and the driver is still alive after sending it (a real driver
blocks until the sandbox is destroyed). A well-framed frame without the token is ignored
(the real report follows, or the exit status decides); bytes that cannot be framed, or a
malformed report with the token, stop the run: a verdict about the program
(``report_violation``), never ``internal_error``.
"""

from __future__ import annotations

import abc
import contextlib
import os
import secrets
import select
import selectors
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from execbox.errors import SandboxError, SandboxProtocolError, SandboxStartError
from execbox.isolation.base import DriverReport, OutputSink, RunOutcome, Sandbox, SandboxSpec
from execbox.isolation.cgroups import Cgroup
from execbox.isolation.hostproc import read_available
from execbox.isolation.protocol import FrameReader, encode_request, parse_report
from execbox.models import ExecutionRequest, Limits

__all__ = ["CELL_GRACE_S", "Supervised", "await_ready", "SupervisedSandbox", "supervise", "wait_ready"]

_CHUNK = 65536
#: how long output may keep arriving after the driver's report or death
_DRAIN_S = 0.05
#: poll(2), not epoll: a selector lives for one run and watches a handful of fds, and epoll
#: costs a system call to create it, one per fd registered and one to close it (each a
#: release of the GIL that the service's other threads contend for)
_Selector = selectors.PollSelector
#: how long a session cell may run past its time limit before the host kills the interpreter
CELL_GRACE_S = 2.0


@dataclass
class Supervised:
    stdout: bytes
    stderr: bytes
    report: DriverReport | None
    timed_out: bool
    output_capped: bool
    wall_time_ms: float
    #: why the report channel was not believed (the program wrote to it), else None
    violation: str | None = None
    #: the cgroup reported that it hit its memory limit during the run
    oom_notified: bool = False


def wait_ready(events_fd: int, timeout_s: float, reader: FrameReader) -> None:
    """Block until the driver's ``ready`` event; raises SandboxProtocolError on EOF/timeout."""
    deadline = time.monotonic() + timeout_s
    with _Selector() as sel:
        sel.register(events_fd, selectors.EVENT_READ)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise SandboxProtocolError(f"driver not ready after {timeout_s:.1f}s")
            if not sel.select(remaining):
                continue
            data = os.read(events_fd, _CHUNK)
            if not data:
                raise SandboxProtocolError("driver exited before it was ready")
            for message in reader.feed(data):
                if message.get("event") == "ready":
                    return
                raise SandboxProtocolError(f"unexpected event before ready: {message.get('event')!r}")


def await_ready(fds: dict[str, int], spec: SandboxSpec, sandbox_id: str) -> FrameReader:
    """Wait for the driver's ``ready`` on ``fds["events"]``; a failure (SandboxStartError)
    says what the sandbox printed on ``fds["stderr"]``."""
    reader = FrameReader()
    try:
        wait_ready(fds["events"], spec.startup_timeout_s, reader)
    except SandboxError as exc:
        stderr = read_available(fds["stderr"])
        raise SandboxStartError(f"sandbox {sandbox_id} did not start: {exc}; stderr: {stderr}") from exc
    return reader


def supervise(
    *,
    control_fd: int,
    events_fd: int,
    stdout_fd: int,
    stderr_fd: int,
    payload: bytes,
    wall_time_s: float,
    output_bytes: int,
    kill: Callable[[], None],
    reader: FrameReader,
    on_output: OutputSink | None = None,
    exited_fd: int | None = None,
    oom_fd: int | None = None,
    token: str | None = None,
) -> Supervised:
    """Run one request to its end: the driver's report, its death, the deadline or the cap.

    The driver's death shows as the end of its events channel or, where others hold that
    channel too (the gVisor two walls), as ``exited_fd`` becoming readable. On timeout or
    output cap, ``kill`` is called and the partial output is kept. With ``token`` (sent in
    ``payload``), only a report that carries it is believed. ``oom_fd`` (the cgroup's OOM
    notification) ends the run at once: a program at its memory limit may hang rather than
    die, and the verdict is the memory limit either way.
    """
    out = {stdout_fd: bytearray(), stderr_fd: bytearray()}
    report: DriverReport | None = None
    violation: str | None = None
    timed_out = capped = oom_notified = False
    pending = memoryview(payload)
    start = time.monotonic()
    deadline = start + wall_time_s
    drain_until: float | None = None  # set once the driver died without a report

    def total() -> int:
        return len(out[stdout_fd]) + len(out[stderr_fd])

    for fd in (control_fd, events_fd, stdout_fd, stderr_fd):
        os.set_blocking(fd, False)
    with _Selector() as sel:
        sel.register(control_fd, selectors.EVENT_WRITE)
        for fd in (events_fd, stdout_fd, stderr_fd):
            sel.register(fd, selectors.EVENT_READ)
        if exited_fd is not None:
            sel.register(exited_fd, selectors.EVENT_READ)
        if oom_fd is not None:
            with contextlib.suppress(OSError):
                os.read(oom_fd, 8)  # an earlier execution's notification (a reused cgroup)
            sel.register(oom_fd, selectors.EVENT_READ)
        while report is None and not capped and violation is None:
            now = time.monotonic()
            if drain_until is not None and (now >= drain_until or not sel.get_map()):
                break
            if now >= deadline:
                timed_out = True
                kill()
                break
            for key, _ in sel.select(min(deadline, drain_until or deadline) - now):
                fd = key.fd
                if fd == control_fd:
                    try:
                        pending = pending[os.write(fd, pending) :]
                    except BlockingIOError:
                        continue
                    except BrokenPipeError:
                        pending = pending[:0]
                    if not pending:
                        sel.unregister(fd)
                    continue
                if fd in (exited_fd, oom_fd):
                    sel.unregister(fd)
                    if fd == oom_fd:
                        oom_notified = True
                        kill()
                    drain_until = time.monotonic() + _DRAIN_S
                    continue
                try:
                    data = os.read(fd, _CHUNK)
                except BlockingIOError:
                    continue
                if not data:
                    sel.unregister(fd)
                    if fd == events_fd:
                        drain_until = time.monotonic() + _DRAIN_S
                        if control_fd in sel.get_map():
                            sel.unregister(control_fd)
                elif fd == events_fd:
                    try:
                        report = _authentic_report(reader.feed(data), token)
                    except SandboxProtocolError as exc:
                        violation = str(exc)
                        kill()
                        break
                else:
                    out[fd] += data
                    if on_output is not None:
                        room = output_bytes - (total() - len(data))
                        if room > 0:
                            on_output("stdout" if fd == stdout_fd else "stderr", data[:room])
                    if total() > output_bytes:
                        capped = True
                        kill()
                        break
    if report is not None and not capped and _driver_died(events_fd, exited_fd):
        report = None  # the process ended right after "reporting": not the driver's report
    if report is not None and not capped:
        # the driver flushed before reporting, so its output is already in the pipes
        for fd in (stdout_fd, stderr_fd):
            with contextlib.suppress(OSError):
                while total() <= output_bytes and (chunk := os.read(fd, _CHUNK)):
                    out[fd] += chunk
                    if on_output is not None:
                        on_output("stdout" if fd == stdout_fd else "stderr", chunk)
        capped = total() > output_bytes
        if capped:
            kill()
    wall_ms = (time.monotonic() - start) * 1000.0
    stdout, stderr = bytes(out[stdout_fd]), bytes(out[stderr_fd])
    if capped:
        stdout = stdout[:output_bytes]
        stderr = stderr[: max(0, output_bytes - len(stdout))]
    return Supervised(stdout, stderr, report, timed_out, capped, wall_ms, violation, oom_notified)


def _authentic_report(messages: list[dict[str, object]], token: str | None) -> DriverReport | None:
    """The first report among ``messages`` that carries ``token``; frames without it are
    not the driver's and are ignored; a malformed report with it raises."""
    for message in messages:
        if token is not None and not (isinstance(message.get("token"), str) and secrets.compare_digest(
            str(message["token"]), token
        )):
            continue
        if message.get("event") != "done":
            raise SandboxProtocolError(f"unexpected event {message.get('event')!r}")
        return parse_report(message)
    return None


def _driver_died(events_fd: int, exited_fd: int | None) -> bool:
    """Whether the driver has ended: its events channel closed or, where that channel is
    shared (the gVisor two walls), its exit notified on ``exited_fd``."""
    return _closed(events_fd) or (exited_fd is not None and bool(select.select([exited_fd], [], [], 0)[0]))


def _closed(fd: int) -> bool:
    """Whether the other end of ``fd`` is closed already (non-blocking peek)."""
    try:
        return os.read(fd, _CHUNK) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


class SupervisedSandbox(Sandbox):
    """A sandbox in a cgroup whose driver talks over pipes: the one ``run`` of every backend.

    Subclasses say how to kill it (``_kill``), how it ended (``_exit_status``: waits up to
    its timeout, returns ``(exit_code, None)`` or ``(None, signal)``, raises TimeoutError),
    whether it still runs (``_running``), and what ``destroy`` does (``_teardown``).
    ``fds`` holds the host ends ``control``, ``events``, ``stdout``, ``stderr``; ``release``
    undoes everything the sandbox holds on the host.
    """

    def __init__(
        self,
        spec: SandboxSpec,
        sandbox_id: str,
        *,
        cgroup: Cgroup,
        fds: dict[str, int],
        reader: FrameReader,
        release: contextlib.ExitStack,
    ) -> None:
        super().__init__(spec, sandbox_id)
        self.cgroup = cgroup
        self._fds = fds
        self._reader = reader
        self._release = release
        self._used = False
        self._cells = False
        self._destroyed = False
        self._nice = spec.warm_nice
        self._lock = threading.Lock()
        self._run_lock = threading.Lock()

    @abc.abstractmethod
    def _kill(self) -> None: ...

    @abc.abstractmethod
    def _exit_status(self, timeout_s: float) -> tuple[int | None, int | None]: ...

    @abc.abstractmethod
    def _running(self) -> bool: ...

    def _set_memory_limit(self, memory_bytes: int) -> None:
        self.cgroup.set_memory_limit(memory_bytes)

    def _limit_memory(self, limits: Limits) -> None:
        """Apply the execution's memory limit (single-use sandboxes: lower the spec's)."""
        if limits.memory_bytes < self.spec.memory_bytes:
            self._set_memory_limit(limits.memory_bytes)

    def _exited_fd(self) -> int | None:
        """An fd that becomes readable when the driver has died (None: its events channel ends)."""
        return None

    def _usage(self) -> tuple[bool, int | None, float | None]:
        """(OOM-killed, peak memory bytes, CPU ms) of this execution."""
        return self.cgroup.oom_kills() > 0, self.cgroup.memory_peak_bytes(), self.cgroup.cpu_time_ms()

    def _teardown(self) -> None:
        self._kill()

    def _host_threads(self) -> list[int]:
        """The host threads that run this sandbox (to restore their priority)."""
        return self.cgroup.threads()

    def _renice(self, nice: int) -> None:
        """Built at ``spec.warm_nice``, the sandbox runs its program (and, after ``waiting()``,
        waits for it) at nice 0 and is torn down at ``warm_nice`` again, so that neither
        building nor tearing down slows the programs that are running."""
        if not self.spec.warm_nice or nice == self._nice:
            return
        self._nice = nice
        for tid in self._host_threads():
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, tid, nice)

    def waiting(self) -> None:
        """The driver said ready and the sandbox only waits now: it may wait at nice 0 already,
        so that a request does not pay for the renice (with gVisor, every thread of the
        sentry and its stubs)."""
        self._renice(0)

    def alive(self) -> bool:
        return (not self._used or self._cells) and not self._destroyed and self._running()

    def run(self, request: ExecutionRequest, limits: Limits, on_output: OutputSink | None = None) -> RunOutcome:
        with self._run_lock:
            if self._used or self._destroyed:
                raise SandboxError(f"sandbox {self.id} was already used")
            self._used = True
            return self._run(request, limits, on_output)

    def run_cell(
        self, request: ExecutionRequest, limits: Limits, timeout_s: float, on_output: OutputSink | None = None
    ) -> RunOutcome:
        with self._run_lock:
            if (self._used and not self._cells) or self._destroyed:
                raise SandboxError(f"sandbox {self.id} was already used")
            self._used = self._cells = True
            return self._run(request, limits, on_output, cell_timeout_s=timeout_s)

    def _run(
        self, request: ExecutionRequest, limits: Limits, on_output: OutputSink | None, cell_timeout_s: float | None = None
    ) -> RunOutcome:
        try:
            self._limit_memory(limits)
        except SandboxError:  # the kernel refuses a limit below what the sandbox already uses
            return RunOutcome(
                stdout=b"", report=None, exit_code=None, signal=None, oom_killed=True,
                stderr=f"execbox: the sandbox needs more memory than the limit of {limits.memory_bytes} bytes "
                "before the program starts\n".encode(),
            )
        self._renice(0)
        cpu_before_ms = self.cgroup.cpu_time_ms() if cell_timeout_s is not None else None
        token = secrets.token_hex(16)
        seen = supervise(
            token=token,
            control_fd=self._fds["control"],
            events_fd=self._fds["events"],
            stdout_fd=self._fds["stdout"],
            stderr_fd=self._fds["stderr"],
            payload=encode_request(request, token, cell_timeout_s),
            # a cell's driver interrupts it at its limit; the host kills only one that does not stop
            wall_time_s=(
                min(limits.wall_time_s, self.spec.wall_time_s) if cell_timeout_s is None else cell_timeout_s + CELL_GRACE_S
            ),
            output_bytes=min(limits.output_bytes, self.spec.output_bytes),
            kill=self._kill,
            reader=self._reader,
            on_output=on_output,
            exited_fd=self._exited_fd(),
            oom_fd=self.cgroup.oom_notifier(),
        )
        exit_code = signal_number = None
        if seen.report is None:
            try:
                exit_code, signal_number = self._exit_status(5.0)
            except TimeoutError:
                self._kill()
                exit_code, signal_number = self._exit_status(5.0)
            if seen.timed_out or seen.output_capped or seen.violation:
                exit_code = signal_number = None  # we killed it: the verdict says why
        oom_killed, memory_peak_bytes, cpu_time_ms = self._usage()
        if cpu_before_ms is not None and cpu_time_ms is not None:
            cpu_time_ms = max(0.0, cpu_time_ms - cpu_before_ms)  # a session's cell: its own CPU time
        oom_killed = oom_killed or seen.oom_notified
        return RunOutcome(
            stdout=seen.stdout,
            stderr=seen.stderr,
            report=seen.report,
            exit_code=exit_code,
            signal=signal_number,
            timed_out=seen.timed_out,
            output_capped=seen.output_capped,
            report_violation=seen.violation,
            oom_killed=oom_killed,
            wall_time_ms=seen.wall_time_ms,
            memory_peak_bytes=memory_peak_bytes,
            cpu_time_ms=cpu_time_ms,
        )

    def abort(self) -> None:
        if self._used and not self._destroyed:
            self._kill()

    def destroy(self) -> None:
        with self._lock:
            if self._destroyed:
                return
            self._destroyed = True
        if self._run_lock.locked():
            self._kill()  # a run still going on returns now: only then are its fds released
        with self._run_lock:
            try:
                self._renice(self.spec.warm_nice)
                self._teardown()
            finally:
                self._release.close()
