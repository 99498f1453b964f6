"""Host-side helpers shared by the backends: closing fds once, killing processes."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import signal
import stat
import subprocess
from pathlib import Path

from execbox.errors import SandboxError, SandboxStartError

__all__ = [
    "close_all", "driver_pipes", "kill_pidfd", "kill_process", "mount_tmpfs", "open_dir_nofollow", "read_available", "remove_workspace",
]  # fmt: skip

_MS_NOSUID, _MS_NODEV, _MNT_DETACH = 0x2, 0x4, 0x2
_libc = ctypes.CDLL(None, use_errno=True)


def close_all(fds: dict[str, int]) -> None:
    """Close every fd left in ``fds`` exactly once (the dict is emptied)."""
    while fds:
        _, fd = fds.popitem()
        with contextlib.suppress(OSError):
            os.close(fd)


def driver_pipes(fds: dict[str, int]) -> None:
    """Open the four pipes of the driver protocol into ``fds``: the host ends ``control``,
    ``events``, ``stdout``, ``stderr`` and the sandbox's ``control_r``, ``events_w``,
    ``stdout_w``, ``stderr_w`` (the caller closes them all, e.g. with :func:`close_all`)."""
    fds["control_r"], fds["control"] = os.pipe()
    fds["events"], fds["events_w"] = os.pipe()
    fds["stdout"], fds["stdout_w"] = os.pipe()
    fds["stderr"], fds["stderr_w"] = os.pipe()


def kill_process(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL a child process and reap it."""
    with contextlib.suppress(ProcessLookupError):
        process.kill()
    process.wait()


def kill_pidfd(pidfd: int) -> None:
    """SIGKILL the process behind a pidfd (race-free: the pid cannot have been reused)."""
    with contextlib.suppress(ProcessLookupError, OSError):
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)


def open_dir_nofollow(name: str, dir_fd: int) -> int:
    """``open(name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC, dir_fd=dir_fd)``, also on
    a kernel that follows a symlink there despite O_NOFOLLOW (gVisor's, 2024-07, when
    O_DIRECTORY is given): the name itself is opened (O_PATH | O_NOFOLLOW) and refused with
    ENOTDIR unless it is a directory, then that very directory is opened (through the fd,
    not the name again: a program cannot swap a symlink in between)."""
    path = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        if not stat.S_ISDIR(os.fstat(path).st_mode):
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), name)
        return os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=path)
    finally:
        os.close(path)


def read_available(fd: int, limit: int = 4096) -> str:
    """What a pipe holds right now, without blocking (for error messages)."""
    os.set_blocking(fd, False)
    try:
        return os.read(fd, limit).decode(errors="replace").strip()
    except OSError:
        return ""


def mount_tmpfs(target: Path, size_bytes: int, uid: int) -> None:
    options = f"size={size_bytes},mode=0700,uid={uid},gid={uid}".encode()
    if _libc.mount(b"tmpfs", os.fsencode(target), b"tmpfs", _MS_NOSUID | _MS_NODEV, options) != 0:
        raise SandboxStartError(f"cannot mount the workspace tmpfs at {target}: {os.strerror(ctypes.get_errno())}")


def _umount(target: Path) -> None:
    if _libc.umount2(os.fsencode(target), 0) == 0 or ctypes.get_errno() == errno.EINVAL:  # EINVAL: not mounted
        return
    if _libc.umount2(os.fsencode(target), _MNT_DETACH) != 0:
        raise SandboxError(f"cannot unmount {target}: {os.strerror(ctypes.get_errno())}")


def _mounts_under(directory: Path) -> list[Path]:
    """Mount points below ``directory``, deepest first."""
    prefix = os.path.realpath(directory) + "/"
    with open("/proc/self/mountinfo") as mountinfo:
        targets = [line.split()[4].replace("\\040", " ") for line in mountinfo]
    return sorted((Path(t) for t in targets if t.startswith(prefix)), key=lambda p: len(p.parts), reverse=True)


def remove_workspace(workspace: Path) -> None:
    for mount_point in _mounts_under(workspace):
        _umount(mount_point)
    for _ in range(8):  # a tmpfs, or several stacked by accident
        if Path(os.path.realpath(workspace)) not in _mounts_under(workspace.parent):
            break
        _umount(workspace)
    with contextlib.suppress(FileNotFoundError):
        workspace.rmdir()
