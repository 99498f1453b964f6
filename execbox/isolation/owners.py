"""Who owns a sandbox: names carry the owning process's pid, so that start-up reaps only
what a *dead* execbox process left behind, never the live sandboxes of another one
(a running service and an ``execbox run`` or a test suite on the same host)."""

from __future__ import annotations

import os
import uuid

__all__ = ["is_orphan", "sandbox_name"]


def sandbox_name(kind: str) -> str:
    """``<kind>-<owner pid>-<random>``, e.g. ``ns-4242-1a2b3c4d5e6f``."""
    return f"{kind}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


def is_orphan(name: str) -> bool:
    """True unless ``name`` carries the pid of a process that is still alive."""
    parts = name.split("-")
    if len(parts) < 3 or not parts[1].isdigit():
        return True
    return not os.path.exists(f"/proc/{parts[1]}")
