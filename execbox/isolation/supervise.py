"""Drive one run of a started driver: send the request, read output and events under a
deadline and an output cap. Shared by every backend whose driver talks over pipes."""

from __future__ import annotations

import contextlib
import os
import selectors
import time
from collections.abc import Callable
from dataclasses import dataclass

from execbox.errors import SandboxProtocolError
from execbox.isolation.base import DriverReport
from execbox.isolation.protocol import FrameReader, parse_report

__all__ = ["Supervised", "supervise", "wait_ready"]

_CHUNK = 65536
#: how long output may keep arriving after the driver's report or death
_DRAIN_S = 0.05


@dataclass
class Supervised:
    stdout: bytes
    stderr: bytes
    report: DriverReport | None
    timed_out: bool
    output_capped: bool
    wall_time_ms: float


def wait_ready(events_fd: int, timeout_s: float, reader: FrameReader) -> None:
    """Block until the driver's ``ready`` event; raises SandboxProtocolError on EOF/timeout."""
    deadline = time.monotonic() + timeout_s
    with selectors.DefaultSelector() as sel:
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
) -> Supervised:
    """Run one request to its end: the driver's report, its death, the deadline or the cap.

    On timeout or output cap, ``kill`` is called and the partial output is kept.
    """
    out = {stdout_fd: bytearray(), stderr_fd: bytearray()}
    report: DriverReport | None = None
    timed_out = capped = False
    pending = memoryview(payload)
    start = time.monotonic()
    deadline = start + wall_time_s
    drain_until: float | None = None  # set once the driver died without a report

    def total() -> int:
        return len(out[stdout_fd]) + len(out[stderr_fd])

    for fd in (control_fd, events_fd, stdout_fd, stderr_fd):
        os.set_blocking(fd, False)
    with selectors.DefaultSelector() as sel:
        sel.register(control_fd, selectors.EVENT_WRITE)
        for fd in (events_fd, stdout_fd, stderr_fd):
            sel.register(fd, selectors.EVENT_READ)
        while report is None and not capped:
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
                    for message in reader.feed(data):
                        if message.get("event") != "done":
                            raise SandboxProtocolError(f"unexpected event {message.get('event')!r}")
                        report = parse_report(message)
                else:
                    out[fd] += data
                    if total() > output_bytes:
                        capped = True
                        kill()
                        break
    if report is not None and not capped:
        # the driver flushed before reporting, so its output is already in the pipes
        for fd in (stdout_fd, stderr_fd):
            with contextlib.suppress(OSError):
                while total() <= output_bytes and (chunk := os.read(fd, _CHUNK)):
                    out[fd] += chunk
        capped = total() > output_bytes
        if capped:
            kill()
    wall_ms = (time.monotonic() - start) * 1000.0
    stdout, stderr = bytes(out[stdout_fd]), bytes(out[stderr_fd])
    if capped:
        stdout = stdout[:output_bytes]
        stderr = stderr[: max(0, output_bytes - len(stdout))]
    return Supervised(stdout, stderr, report, timed_out, capped, wall_ms)
