"""Collect the files a program saved under ``artifacts/`` in its working directory.

Read from the host side through a directory fd of the live sandbox's workspace,
component by component with O_NOFOLLOW: a symlink (to /etc/passwd or anywhere) yields
nothing, and so does anything that is not a regular file. Allowed: .png .jpg .jpeg
.svg .pdf .csv .json .html; at most 10 files of at most 10 MiB each (sorted by name,
the rest ignored).
"""

from __future__ import annotations

import contextlib
import os
import stat
from types import MappingProxyType

from execbox.models import Artifact

__all__ = ["ARTIFACTS_DIR", "MAX_ARTIFACTS", "MAX_ARTIFACT_BYTES", "MIME_TYPES", "collect_artifacts"]

ARTIFACTS_DIR = "artifacts"
MAX_ARTIFACTS = 10
MAX_ARTIFACT_BYTES = 10 << 20
MIME_TYPES = MappingProxyType(
    {
        ".png": "image/png",
        ".jpg": "image/jpeg",
        ".jpeg": "image/jpeg",
        ".svg": "image/svg+xml",
        ".pdf": "application/pdf",
        ".csv": "text/csv",
        ".json": "application/json",
        ".html": "text/html",
    }
)
_NOFOLLOW = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def _read_regular(dir_fd: int, name: str) -> bytes | None:
    try:
        fd = os.open(name, _NOFOLLOW, dir_fd=dir_fd)
    except OSError:  # ELOOP for a symlink, or gone
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_ARTIFACT_BYTES:
            return None
        chunks, size = [], 0
        while chunk := os.read(fd, 1 << 20):
            size += len(chunk)
            if size > MAX_ARTIFACT_BYTES:
                return None
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def collect_artifacts(workspace_fd: int) -> tuple[Artifact, ...]:
    """The allowed regular files directly under ``artifacts/`` of the workspace."""
    try:
        dir_fd = os.open(ARTIFACTS_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=workspace_fd)
    except OSError:
        return ()
    found: list[Artifact] = []
    try:
        with contextlib.suppress(OSError):
            names = sorted(os.listdir(dir_fd))
        for name in names:
            mime = MIME_TYPES.get(os.path.splitext(name)[1].lower())
            if mime is None:
                continue
            content = _read_regular(dir_fd, name)
            if content is None:
                continue
            found.append(Artifact(name=name, mime_type=mime, size=len(content), content=content))
            if len(found) == MAX_ARTIFACTS:
                break
    finally:
        os.close(dir_fd)
    return tuple(found)
