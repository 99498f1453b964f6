"""Sandbox uids: one host uid per live sandbox, claimed host-wide (``namespaces`` re-exports them)."""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path

from execbox.errors import SandboxStartError

__all__ = ["UID_LOCK_DIR", "UidAllocator"]

#: host-wide uid claims (a tmpfs: emptied at boot, like the claims themselves)
UID_LOCK_DIR = Path("/run/execbox/uids")


class UidAllocator:
    """Hands out one host uid per live sandbox from a fixed range (thread-safe).

    A uid is also claimed host-wide with an ``flock`` on ``<lock_dir>/<uid>``, held while
    the sandbox lives (the kernel drops it if the process dies), so two execbox processes
    on one host (a service, ``execbox run``, a test suite) never share a uid, and per-uid
    limits such as RLIMIT_NPROC never couple their sandboxes.
    """

    def __init__(self, base: int, count: int, lock_dir: Path) -> None:
        self._free = list(range(base + count - 1, base - 1, -1))
        self._held: dict[int, int] = {}
        self._lock_dir = lock_dir
        self._lock = threading.Lock()

    def acquire(self) -> int:
        with self._lock:
            self._lock_dir.mkdir(parents=True, exist_ok=True)
            for _ in range(len(self._free)):
                uid = self._free.pop()
                fd = os.open(self._lock_dir / str(uid), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:  # another execbox process holds it
                    os.close(fd)
                    self._free.insert(0, uid)
                    continue
                self._held[uid] = fd
                return uid
            raise SandboxStartError("no free sandbox uid; raise SANDBOX_UID_COUNT")

    def release(self, uid: int) -> None:
        with self._lock:
            os.close(self._held.pop(uid))
            self._free.append(uid)
