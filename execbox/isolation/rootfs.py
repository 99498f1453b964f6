"""What a sandbox sees, written once: the mount plan and the minimal ``/etc``.

The plan is rendered by every launcher: as bwrap arguments (``namespaces``, bwrap
launcher), as the zygote's mount steps (``namespaces`` fork server, and the inner wall
inside gVisor), and as the OCI bundle's mounts of a gVisor sandbox (the outer wall).

Plan steps are ``(op, a, b)``: ``ro-bind``/``bind`` (host source, target), ``symlink``
(link text, path), ``tmpfs`` (path, size in bytes), ``proc`` (path, ""), ``dev`` (path, "").
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

from execbox.isolation.base import SandboxSpec
from execbox.runtimes import DRIVER_MOUNT, WORKSPACE
from execbox.runtimes.base import EGRESS_DIR

__all__ = ["ETC_DIRS_FROM_HOST", "PlanStep", "egress_step", "guest_plan", "mount_plan", "publish_etc"]

PlanStep = tuple[str, str, str]
ETC_FILES_FROM_HOST = ("ld.so.cache", "localtime", "mime.types")
#: host directories seen read-only under the sandbox's /etc (certificates, fonts...)
ETC_DIRS_FROM_HOST = ("ssl", "alternatives", "fonts")
_published: dict[Path, Path] = {}
_lock = threading.Lock()


def mount_plan(spec: SandboxSpec, etc_dir: Path, runtime_target: str) -> list[PlanStep]:
    """The sandbox's file system, in order; one plan for every launcher.

    ``runtime_target`` is where the runtime environment appears (``/opt/runtime`` inside a
    sandbox; the host path itself for the host fork server, whose interpreter's own paths
    must stay valid).
    """
    plan: list[PlanStep] = [("ro-bind", "/usr", "/usr")]
    for name in ("bin", "lib", "lib64", "sbin"):
        host = Path("/", name)
        if host.is_symlink():
            plan.append(("symlink", os.readlink(host), f"/{name}"))
        elif host.is_dir():
            plan.append(("ro-bind", str(host), f"/{name}"))
    plan.append(("ro-bind", str(etc_dir), "/etc"))
    plan += [("ro-bind", f"/etc/{name}", f"/etc/{name}") for name in ETC_DIRS_FROM_HOST if Path("/etc", name).is_dir()]
    plan += [("proc", "/proc", ""), ("dev", "/dev", "")]
    plan += [("tmpfs", "/tmp", str(spec.tmp_bytes)), ("tmpfs", "/dev/shm", str(spec.tmp_bytes))]
    plan.append(("tmpfs", WORKSPACE, str(spec.workspace_bytes)))
    plan.append(("ro-bind", str(spec.runtime_env_dir), runtime_target))
    plan.append(("ro-bind", str(spec.runtime.driver_path), f"{DRIVER_MOUNT}/{spec.runtime.driver_path.name}"))
    plan += [("bind" if m.writable else "ro-bind", str(m.source), m.target) for m in spec.mounts]
    return plan


def egress_step(host_dir: Path) -> PlanStep:
    """The one step a sandbox with egress adds to its plan: its own proxy socket's directory
    (see ``EgressPorts``), read-only at EGRESS_DIR."""
    return ("ro-bind", str(host_dir), EGRESS_DIR)


def guest_plan(plan: Sequence[PlanStep]) -> list[PlanStep]:
    """The same plan as seen from inside a gVisor sandbox whose bundle already binds every
    source at its target: each bind's source becomes its target."""
    return [(op, b, b) if op in ("ro-bind", "bind") else (op, a, b) for op, a, b in plan]


def publish_etc(state_dir: Path, uid_base: int, uid_count: int) -> Path:
    """A minimal /etc for sandboxes: users (one per sandbox uid), hosts, and the host's loader
    cache and time zone; empty mount points for the host directories of ETC_DIRS_FROM_HOST.

    Named by a hash of its content and published by an atomic rename, never changed or
    deleted afterwards: services sharing a state directory never see it half-built.
    """
    users = [f"sandbox{uid - uid_base}:x:{uid}:{uid}:sandbox:/tmp:/usr/sbin/nologin" for uid in range(uid_base, uid_base + uid_count)]
    groups = [f"sandbox{gid - uid_base}:x:{gid}:" for gid in range(uid_base, uid_base + uid_count)]
    files = {
        "passwd": "\n".join(["root:x:0:0:root:/root:/usr/sbin/nologin", *users, "nobody:x:65534:65534::/nonexistent:/usr/sbin/nologin"]) + "\n",
        "group": "\n".join(["root:x:0:", *groups, "nogroup:x:65534:"]) + "\n",
        "hosts": "127.0.0.1 localhost sandbox\n::1 localhost sandbox\n",
        "hostname": "sandbox\n",
        "nsswitch.conf": "passwd: files\ngroup: files\nhosts: files dns\n",
    }
    contents = {name: text.encode() for name, text in files.items()}
    for name in ETC_FILES_FROM_HOST:
        if Path("/etc", name).is_file():
            contents[name] = Path("/etc", name).read_bytes()
    digest = hashlib.sha256(json.dumps({k: v.hex() for k, v in sorted(contents.items())}).encode()).hexdigest()
    etc = state_dir / f"etc-{digest[:16]}"
    with _lock:
        if _published.get(etc) is not None:
            return etc
        if not etc.is_dir():
            state_dir.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=".etc-", dir=state_dir))
            for name, data in contents.items():
                (staging / name).write_bytes(data)
                (staging / name).chmod(0o644)
            for name in ETC_DIRS_FROM_HOST:
                (staging / name).mkdir()
            staging.chmod(0o755)
            try:
                os.rename(staging, etc)
            except OSError:  # published meanwhile by another process: same content
                shutil.rmtree(staging, ignore_errors=True)
        _published[etc] = etc
    return etc
