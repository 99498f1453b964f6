"""What a sandbox sees, written once: the mount plan and the minimal ``/etc``.

The plan is rendered by every launcher: as bwrap arguments (``namespaces``, bwrap
launcher), as the zygote's mount steps (``namespaces`` fork server, and the inner wall
inside gVisor), and as the OCI bundle's mounts of a gVisor sandbox (both the single-use
sandbox and the outer wall of two walls), whose read-only root skeleton
(:func:`execbox.isolation.oci.make_mount_points`) is derived from the same plan.

A plan is a list of :class:`PlanStep`, in mount order: a bind (read-only or not) of a host
``source`` at ``target``, a ``symlink`` (link text ``source``) at ``target``, a size-capped
``tmpfs``, ``proc`` or a minimal ``dev`` at ``target``. The zygote, which is stdlib only,
receives each step as its :meth:`PlanStep.wire` triple.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path

from execbox.isolation.base import SandboxSpec
from execbox.runtimes import DRIVER_MOUNT, RUNTIME_MOUNT, WORKSPACE
from execbox.runtimes.base import EGRESS_DIR

__all__ = ["ETC_DIRS_FROM_HOST", "Op", "PlanStep", "egress_step", "guest_plan", "mount_plan", "publish_etc", "system_steps"]

ETC_FILES_FROM_HOST = ("ld.so.cache", "localtime", "mime.types")
#: host directories seen read-only under the sandbox's /etc (certificates, fonts...)
ETC_DIRS_FROM_HOST = ("ssl", "alternatives", "fonts")
_published: dict[Path, Path] = {}
_lock = threading.Lock()


class Op(StrEnum):
    """What one plan step mounts (the values are the zygote's and bwrap's names)."""

    RO_BIND = "ro-bind"
    BIND = "bind"
    SYMLINK = "symlink"
    TMPFS = "tmpfs"
    PROC = "proc"
    DEV = "dev"


@dataclass(frozen=True)
class PlanStep:
    """One step of a sandbox's file system: ``op`` at ``target`` (a path inside the sandbox).

    ``source``: the host path of a bind, the link text of a symlink; ``size_bytes``: the
    size cap of a tmpfs.
    """

    op: Op
    target: str
    source: str = ""
    size_bytes: int = 0

    @classmethod
    def bind(cls, source: Path | str, target: str, *, writable: bool = False) -> PlanStep:
        return cls(Op.BIND if writable else Op.RO_BIND, target, str(source))

    @classmethod
    def tmpfs(cls, target: str, size_bytes: int) -> PlanStep:
        return cls(Op.TMPFS, target, size_bytes=size_bytes)

    @property
    def is_bind(self) -> bool:
        return self.op in (Op.RO_BIND, Op.BIND)

    @property
    def writable(self) -> bool:
        """Whether the sandbox can write below ``target`` (a read-write bind, a tmpfs)."""
        return self.op in (Op.BIND, Op.TMPFS)

    def wire(self) -> list[str]:
        """The zygote's ``[op, a, b]``: (source, target) of a bind or symlink, (target, size)
        of a tmpfs, (target, "") of proc and dev."""
        if self.is_bind or self.op is Op.SYMLINK:
            return [self.op.value, self.source, self.target]
        return [self.op.value, self.target, str(self.size_bytes) if self.op is Op.TMPFS else ""]


def system_steps() -> list[PlanStep]:
    """The head of every plan, enough to run the host's programs: ``/usr`` and ``/bin``,
    ``/lib``, ``/lib64``, ``/sbin`` as the host has them (links or read-only binds)."""
    steps = [PlanStep.bind("/usr", "/usr")]
    for name in ("bin", "lib", "lib64", "sbin"):
        host = Path("/", name)
        if host.is_symlink():
            steps.append(PlanStep(Op.SYMLINK, f"/{name}", os.readlink(host)))
        elif host.is_dir():
            steps.append(PlanStep.bind(host, f"/{name}"))
    return steps


def mount_plan(spec: SandboxSpec, etc_dir: Path) -> list[PlanStep]:
    """The sandbox's file system, in order; one plan for every launcher. The runtime
    environment is at RUNTIME_MOUNT, the driver under DRIVER_MOUNT."""
    plan = system_steps()
    plan.append(PlanStep.bind(etc_dir, "/etc"))
    plan += [PlanStep.bind(f"/etc/{name}", f"/etc/{name}") for name in ETC_DIRS_FROM_HOST if Path("/etc", name).is_dir()]
    plan += [PlanStep(Op.PROC, "/proc"), PlanStep(Op.DEV, "/dev")]
    plan += [PlanStep.tmpfs("/tmp", spec.tmp_bytes), PlanStep.tmpfs("/dev/shm", spec.tmp_bytes)]
    plan.append(PlanStep.tmpfs(WORKSPACE, spec.workspace_bytes))
    plan.append(PlanStep.bind(spec.runtime_env_dir, RUNTIME_MOUNT))
    plan.append(PlanStep.bind(spec.runtime.driver_path, f"{DRIVER_MOUNT}/{spec.runtime.driver_path.name}"))
    plan += [PlanStep.bind(m.source, m.target, writable=m.writable) for m in spec.mounts]
    return plan


def egress_step(host_dir: Path) -> PlanStep:
    """The one step a sandbox with egress adds to its plan: its own proxy socket's directory
    (see ``EgressPorts``), read-only at EGRESS_DIR."""
    return PlanStep.bind(host_dir, EGRESS_DIR)


def guest_plan(plan: Sequence[PlanStep]) -> list[PlanStep]:
    """The same plan as seen from inside a gVisor sandbox whose bundle already binds every
    source at its target: each bind's source becomes its target."""
    return [replace(step, source=step.target) if step.is_bind else step for step in plan]


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
