"""Files in a live sandbox's workspace, from the host, for the sessions' files API.

Every path is relative to the workspace and checked before any I/O: no absolute path,
no ``..``, no empty or ``.`` component, no NUL. It is then walked one component at a time
from a directory fd of the workspace with ``O_NOFOLLOW`` (directories through
``open_dir_nofollow``, which holds on gVisor's kernel too): a symlink anywhere on the path
(which the program may have planted) is refused, never followed, so the host never
reads or writes outside the sandbox's own workspace. What the host creates belongs to the
workspace's owner (the sandbox's uid), so the program can change it: the host thread
creates it with its filesystem uid and gid set to that owner (``setfsuid(2)``, which is
per thread), which is also the only way to create a file in a workspace that belongs to
a user namespace (bwrap's) where the host's root is not mapped.

Hand-written because the guarantee is in the system calls (``openat`` with
``O_NOFOLLOW`` from a directory fd, ``setfsuid``): path-string checks alone race with the
program, and the standard library has no setfsuid.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import stat
from collections.abc import Iterator

from execbox.errors import BadRequestError, NotFoundError
from execbox.isolation.hostproc import open_dir_nofollow
from execbox.models import SessionFile

__all__ = ["MAX_LISTED_FILES", "list_files", "read_file", "split_path", "write_file"]

#: a listing stops after this many files (a program may create millions)
MAX_LISTED_FILES = 10_000
_LIBC = ctypes.CDLL(None, use_errno=True)


@contextlib.contextmanager
def _as_owner(workspace_fd: int) -> Iterator[None]:
    """This thread creates files as the workspace's owner for the duration."""
    owner = os.fstat(workspace_fd)
    _LIBC.setfsgid(owner.st_gid)
    _LIBC.setfsuid(owner.st_uid)
    try:
        yield
    finally:
        _LIBC.setfsuid(os.geteuid())
        _LIBC.setfsgid(os.getegid())


def split_path(path: str) -> list[str]:
    """The components of a workspace-relative path; BadRequestError saying what is wrong."""
    if not path or "\0" in path:
        raise BadRequestError("a file path must be a non-empty relative path without NUL")
    if path.startswith("/"):
        raise BadRequestError(f"file path {path!r} is absolute: paths are relative to the workspace")
    parts = path.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise BadRequestError(f"file path {path!r} must not contain '..', '.' or empty components")
    return parts


def _refused(path: str, exc: OSError) -> BadRequestError | NotFoundError:
    if exc.errno == errno.ENOENT:
        return NotFoundError(f"no file {path!r} in the session's workspace")
    if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
        return BadRequestError(f"file path {path!r} goes through a symbolic link or a file: refused")
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return BadRequestError(f"the session's workspace has no room for {path!r} (SANDBOX_MAX_DISK)")
    if exc.errno == errno.EISDIR:
        return BadRequestError(f"{path!r} is a directory")
    return BadRequestError(f"cannot access {path!r} in the session's workspace: {exc.strerror}")


def _walk(workspace_fd: int, parts: list[str], path: str, create: bool) -> int:
    """An fd of the directory holding the last component (caller closes)."""
    current = os.dup(workspace_fd)
    try:
        for part in parts[:-1]:
            try:
                child = open_dir_nofollow(part, current)
            except FileNotFoundError:
                if not create:
                    raise
                os.mkdir(part, 0o755, dir_fd=current)
                child = open_dir_nofollow(part, current)
            os.close(current)
            current = child
        return current
    except OSError as exc:
        os.close(current)
        raise _refused(path, exc) from exc


def write_file(workspace_fd: int, path: str, data: bytes) -> SessionFile:
    """Create or replace the regular file ``path`` with ``data`` (parents made as needed)."""
    parts = split_path(path)
    with _as_owner(workspace_fd):
        return _write(workspace_fd, parts, path, data)


def _write(workspace_fd: int, parts: list[str], path: str, data: bytes) -> SessionFile:
    with _opened(workspace_fd, parts, path, os.O_WRONLY | os.O_CREAT, create=True) as fd:
        os.ftruncate(fd, 0)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    return SessionFile(path=path, size=len(data))


def read_file(workspace_fd: int, path: str, max_bytes: int) -> bytes:
    """The content of the regular file ``path`` (at most ``max_bytes``)."""
    with _opened(workspace_fd, split_path(path), path, os.O_RDONLY) as fd:
        size = os.fstat(fd).st_size
        if size > max_bytes:
            raise BadRequestError(f"{path!r} has {size} bytes, more than the {max_bytes} a download may carry")
        chunks, size = [], 0
        while chunk := os.read(fd, 1 << 20):
            size += len(chunk)
            if size > max_bytes:
                raise BadRequestError(f"{path!r} grew beyond the {max_bytes} bytes a download may carry")
            chunks.append(chunk)
        return b"".join(chunks)


@contextlib.contextmanager
def _opened(workspace_fd: int, parts: list[str], path: str, flags: int, create: bool = False) -> Iterator[int]:
    """An fd of the regular file at ``parts`` (never through a symlink), OSErrors said plainly."""
    parent = _walk(workspace_fd, parts, path, create=create)
    try:
        fd = os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o644, dir_fd=parent)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise BadRequestError(f"{path!r} is not a regular file")
            yield fd
        finally:
            os.close(fd)
    except OSError as exc:
        raise _refused(path, exc) from exc
    finally:
        os.close(parent)


def list_files(workspace_fd: int) -> list[SessionFile]:
    """Every regular file under the workspace (symlinks are not followed nor listed),
    sorted by path, at most MAX_LISTED_FILES."""
    found: list[SessionFile] = []
    for path, size in _regular_files(workspace_fd, ""):
        found.append(SessionFile(path=path, size=size))
        if len(found) >= MAX_LISTED_FILES:
            break
    return sorted(found, key=lambda f: f.path)


def _regular_files(dir_fd: int, prefix: str) -> Iterator[tuple[str, int]]:
    with contextlib.suppress(OSError):
        names = sorted(os.listdir(dir_fd))
        for name in names:
            try:
                name.encode("utf-8")
                info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except (OSError, UnicodeEncodeError):
                continue
            if stat.S_ISREG(info.st_mode):
                yield prefix + name, info.st_size
            elif stat.S_ISDIR(info.st_mode):
                try:
                    child = open_dir_nofollow(name, dir_fd)
                except OSError:
                    continue
                try:
                    yield from _regular_files(child, f"{prefix}{name}/")
                finally:
                    os.close(child)
