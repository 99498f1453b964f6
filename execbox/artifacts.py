"""Collect the files a program saved under ``artifacts/`` in its working directory.

Read from the host side through a directory fd of the live sandbox's workspace,
component by component with O_NOFOLLOW (the directory through
``open_dir_nofollow``, which holds on gVisor's kernel too): a symlink (to /etc/passwd or
anywhere) yields nothing, and so does anything that is not a regular file. Allowed: .png .jpg .jpeg
.svg .pdf .csv .json .html; at most 10 files of at most 10 MiB each (sorted by name).

What is left out is said, not dropped in silence: :func:`collect_artifacts_report` also
returns one :class:`~execbox.models.SkippedArtifact` (name, reason) per file that is not
in the answer: over a cap, a type not allowed, not a regular file, or a name that is not
UTF-8 (reported with U+FFFD in place of the undecodable bytes; never fatal).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from types import MappingProxyType

from execbox.isolation.hostproc import open_dir_nofollow
from execbox.models import Artifact, SkippedArtifact

__all__ = [
    "ARTIFACTS_DIR",
    "MAX_ARTIFACTS",
    "MAX_ARTIFACT_BYTES",
    "MAX_SKIPPED_LISTED",
    "MIME_TYPES",
    "artifact_stamps",
    "collect_artifacts",
    "collect_artifacts_report",
]

ARTIFACTS_DIR = "artifacts"
MAX_ARTIFACTS = 10
MAX_ARTIFACT_BYTES = 10 << 20
#: at most this many skipped files are listed (a program may create thousands)
MAX_SKIPPED_LISTED = 100
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


class _Skip(Exception):
    pass


def _read_regular(dir_fd: int, name: str) -> bytes:
    """The content of a regular file, or _Skip(reason)."""
    try:
        fd = os.open(name, _NOFOLLOW, dir_fd=dir_fd)
    except OSError as exc:  # ELOOP for a symlink, or gone
        raise _Skip("a symbolic link" if exc.errno == errno.ELOOP else "cannot be opened") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise _Skip("not a regular file")
        too_large = f"larger than {MAX_ARTIFACT_BYTES} bytes (the cap of one artifact)"
        if info.st_size > MAX_ARTIFACT_BYTES:
            raise _Skip(too_large)
        chunks, size = [], 0
        while chunk := os.read(fd, 1 << 20):
            size += len(chunk)
            if size > MAX_ARTIFACT_BYTES:
                raise _Skip(too_large)
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _stamp(dir_fd: int, name: str) -> Stamp | None:
    try:
        info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return None
    return (info.st_ino, info.st_size, info.st_mtime_ns)


def collect_artifacts(workspace_fd: int) -> tuple[Artifact, ...]:
    """The allowed regular files directly under ``artifacts/`` of the workspace."""
    return collect_artifacts_report(workspace_fd)[0]


#: what identifies one version of a file under artifacts/: (inode, size, mtime in ns)
Stamp = tuple[int, int, int]


def artifact_stamps(workspace_fd: int) -> dict[str, Stamp]:
    """The stamp of every entry under ``artifacts/`` (a session's cell returns only the
    files whose stamp changed while it ran)."""
    try:
        dir_fd = open_dir_nofollow(ARTIFACTS_DIR, workspace_fd)
    except OSError:
        return {}
    stamps: dict[str, Stamp] = {}
    try:
        with contextlib.suppress(OSError):
            for name in os.listdir(dir_fd):
                if (stamp := _stamp(dir_fd, name)) is not None:
                    stamps[name] = stamp
    finally:
        os.close(dir_fd)
    return stamps


def collect_artifacts_report(
    workspace_fd: int, unchanged: dict[str, Stamp] | None = None
) -> tuple[tuple[Artifact, ...], tuple[SkippedArtifact, ...]]:
    """The artifacts, and the files under ``artifacts/`` left out with the reason; with
    ``unchanged`` (from :func:`artifact_stamps`), files still as stamped there are passed over."""
    try:
        dir_fd = open_dir_nofollow(ARTIFACTS_DIR, workspace_fd)
    except OSError:
        return (), ()
    found: list[Artifact] = []
    skipped: list[SkippedArtifact] = []

    def skip(name: str, reason: str) -> None:
        if len(skipped) < MAX_SKIPPED_LISTED:
            shown = os.fsencode(name).decode("utf-8", errors="replace")
            skipped.append(SkippedArtifact(name=shown, reason=reason))

    try:
        names: list[str] = []
        with contextlib.suppress(OSError):
            names = sorted(os.listdir(dir_fd))
        if unchanged:
            names = [name for name in names if unchanged.get(name) != _stamp(dir_fd, name)]
        for name in names:
            try:
                name.encode("utf-8")
            except UnicodeEncodeError:
                skip(name, "the file name is not valid UTF-8")
                continue
            extension = os.path.splitext(name)[1].lower()
            mime = MIME_TYPES.get(extension)
            if mime is None:
                skip(name, f"type {extension or '(none)'} is not allowed (allowed: {' '.join(MIME_TYPES)})")
                continue
            if len(found) == MAX_ARTIFACTS:  # not read: the answer is full
                skip(name, f"more than {MAX_ARTIFACTS} artifacts (the cap)")
                continue
            try:
                content = _read_regular(dir_fd, name)
            except _Skip as exc:
                skip(name, str(exc))
                continue
            found.append(Artifact(name=name, mime_type=mime, size=len(content), content=content))
    finally:
        os.close(dir_fd)
    return tuple(found), tuple(skipped)
