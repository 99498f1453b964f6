"""Host-side helpers shared by the backends: closing fds once, killing processes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess

__all__ = ["close_all", "kill_pidfd", "kill_process", "read_available"]


def close_all(fds: dict[str, int]) -> None:
    """Close every fd left in ``fds`` exactly once (the dict is emptied)."""
    while fds:
        _, fd = fds.popitem()
        with contextlib.suppress(OSError):
            os.close(fd)


def kill_process(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL a child process and reap it."""
    with contextlib.suppress(ProcessLookupError):
        process.kill()
    process.wait()


def kill_pidfd(pidfd: int) -> None:
    """SIGKILL the process behind a pidfd (race-free: the pid cannot have been reused)."""
    with contextlib.suppress(ProcessLookupError, OSError):
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)


def read_available(fd: int, limit: int = 4096) -> str:
    """What a pipe holds right now, without blocking (for error messages)."""
    os.set_blocking(fd, False)
    try:
        return os.read(fd, limit).decode(errors="replace").strip()
    except OSError:
        return ""
