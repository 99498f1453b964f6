"""The OCI runtime config (``config.json``) of one gVisor sandbox, and the translation of a
Docker-format seccomp profile into its ``linux.seccomp`` section. Pure except
:func:`prepare_rootfs` / :func:`make_mount_points` (the bundles' shared root skeleton, whose
mount points and symlinks are those of the mount plan) and
:func:`load_docker_profile`.

Driver channels: this runsc (2022-12) cannot pass extra fds into a sandbox (no
``--pass-fd`` / ``--preserve-fds``); it passes exactly its own stdin, stdout and stderr.
So the host gives the sandbox a *socket* as stdin, and the container's first process is
:data:`CHANNEL_SHELL`, ``/bin/sh -c 'unset PWD; exec "$@" 3<&0 4>&0 </dev/null'``: the
shell duplicates the socket to fd 3 (control, host -> driver) and fd 4 (events, driver
-> host), puts ``/dev/null`` on stdin and execs the driver, which finds its channels at
the usual fds. stdout and stderr stay exactly the program's own output, as in the
namespaces backend. No driver change is needed.

Seccomp translation (``SANDBOX_ENABLE_SECCOMP``; runsc applies OCI seccomp inside the
sandbox only with ``--oci-seccomp``): this runsc

* rejects ``SCMP_ACT_KILL_PROCESS`` and ``SCMP_ACT_KILL_THREAD``: KILL_PROCESS becomes
  ``SCMP_ACT_TRAP`` (SIGSYS, whose default action ends the whole process: the same
  verdict, signal 31, unless the program handles SIGSYS, and then the call still fails),
  KILL_THREAD becomes ``SCMP_ACT_KILL``;
* ignores ``errnoRet``: every ``SCMP_ACT_ERRNO`` rule returns EPERM. A rule asking for
  ENOSYS ("pretend the call does not exist", e.g. ``clone3``, ``io_uring_*``) is dropped,
  because under gVisor the host kernel's implementation is never reached and the
  sentry itself answers ENOSYS for what it does not implement (EPERM for ``clone3``
  would break glibc's thread creation). Any other non-EPERM errno is refused with
  :class:`SeccompProfileError`, never silently changed.

Every change is reported in the ``notes`` returned with the section. The shipped
``execbox/seccomp-profile-default.json`` is the deny-list form (default allow) of the
namespaces backend's built-in filter (:mod:`execbox.isolation.seccomp`): its
``KILLED_SYSCALLS`` and namespace-creating ``clone`` flags kill the process, ``clone3``
and ``io_uring_*`` fail with ENOSYS; the socket-family rule is left to the backends'
network isolation.
"""

from __future__ import annotations

import contextlib
import errno
import json
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from execbox.errors import BackendUnavailableError
from execbox.isolation.base import SandboxSpec
from execbox.isolation.rootfs import Op, PlanStep, system_steps
from execbox.runtimes import CONTROL_FD_ENV, EVENTS_FD_ENV, WORKSPACE

__all__ = [
    "CHANNEL_SHELL",
    "EXPORT_DIR",
    "ZYGOTE_DIR",
    "SeccompProfileError",
    "build_config",
    "build_host_config",
    "docker_profile_to_oci",
    "load_docker_profile",
    "make_mount_points",
    "oci_mounts",
    "prepare_rootfs",
    "probe_config",
]

#: duplicates the stdin socket to fds 3 and 4, puts /dev/null on stdin, execs the driver
CHANNEL_SHELL = ("/bin/sh", "-c", 'unset PWD; exec "$@" 3<&0 4>&0 </dev/null', "execbox-driver")
_CONTROL_FD = 3
_EVENTS_FD = 4
_CPU_PERIOD_US = 100_000
_BIND_RO = ["rbind", "ro", "nosuid", "nodev"]
_BIND_RW = ["rbind", "rw", "nosuid", "nodev"]
#: inside a two-walls gVisor sandbox: where the zygote is and where it exports artifacts
ZYGOTE_DIR = "/opt/execbox"
EXPORT_DIR = "/run/export"
#: the host scratch /tmp of a two-walls gVisor sandbox (the zygote's, never an execution's)
_HOST_TMP_BYTES = 16 << 20
#: what the fork server needs, as root of the sentry's kernel, to build inner sandboxes
_HOST_CAPABILITIES = (
    "CAP_SYS_ADMIN", "CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP", "CAP_KILL", "CAP_CHOWN",
    "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_SYS_PTRACE", "CAP_SYS_CHROOT",
)
_NO_CAPABILITIES: dict[str, list[str]] = {k: [] for k in ("bounding", "effective", "inheritable", "permitted", "ambient")}
#: Docker's architecture names (includes.arches) and seccomp's, per host machine
_ARCHES = {"x86_64": ("amd64", "SCMP_ARCH_X86_64"), "aarch64": ("arm64", "SCMP_ARCH_AARCH64")}
_ACTIONS = {
    "SCMP_ACT_KILL_PROCESS": "SCMP_ACT_TRAP",
    "SCMP_ACT_KILL_THREAD": "SCMP_ACT_KILL",
    "SCMP_ACT_KILL": "SCMP_ACT_KILL",
    "SCMP_ACT_TRAP": "SCMP_ACT_TRAP",
    "SCMP_ACT_ERRNO": "SCMP_ACT_ERRNO",
    "SCMP_ACT_ALLOW": "SCMP_ACT_ALLOW",
    "SCMP_ACT_LOG": "SCMP_ACT_LOG",
}


class SeccompProfileError(BackendUnavailableError):
    """The seccomp profile cannot be applied faithfully by this runsc."""


def _tmpfs(target: str, size_bytes: int, mode: str = "1777") -> dict[str, Any]:
    return {
        "destination": target,
        "type": "tmpfs",
        "source": "tmpfs",
        "options": [f"size={size_bytes}", f"mode={mode}", "nosuid", "nodev"],
    }


def _bind(source: Path | str, target: str, writable: bool = False) -> dict[str, Any]:
    return {"destination": target, "type": "bind", "source": str(source), "options": _BIND_RW if writable else _BIND_RO}


def oci_mounts(plan: Sequence[PlanStep], *, host_dirs: Mapping[str, Path] | None = None) -> list[dict[str, Any]]:
    """The OCI ``mounts`` of a mount plan, in its order. Symlinks are not mounts: they are
    in the root skeleton (:func:`make_mount_points`). A tmpfs whose target is in
    ``host_dirs`` is that host directory (a size-capped tmpfs mounted on the host, so that
    the host can read it) bound read-write instead."""
    host_dirs = host_dirs or {}
    mounts: list[dict[str, Any]] = []
    for step in plan:
        if step.is_bind:
            mounts.append(_bind(step.source, step.target, writable=step.op is Op.BIND))
        elif step.op is Op.TMPFS and step.target in host_dirs:
            mounts.append(_bind(host_dirs[step.target], step.target, writable=True))
        elif step.op is Op.TMPFS:
            mounts.append(_tmpfs(step.target, step.size_bytes))
        elif step.op is Op.PROC:
            mounts.append({"destination": step.target, "type": "proc", "source": "proc"})
        elif step.op is Op.DEV:  # gVisor fills its own /dev with the usual devices
            mounts.append({"destination": step.target, "type": "tmpfs", "source": "tmpfs"})
    return mounts


def _linux(spec: SandboxSpec, cgroups_path: str, memory_limit_bytes: int, pids_limit: int) -> dict[str, Any]:
    """The ``linux`` section every gVisor bundle shares: fresh namespaces, the host cgroup."""
    return {
        "namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount")],
        "cgroupsPath": cgroups_path,
        "resources": {
            "memory": {"limit": memory_limit_bytes, "swap": memory_limit_bytes},
            "pids": {"limit": pids_limit},
            "cpu": {"quota": max(1000, int(spec.cpus * _CPU_PERIOD_US)), "period": _CPU_PERIOD_US},
        },
    }


def build_config(
    spec: SandboxSpec,
    *,
    plan: Sequence[PlanStep],
    uid: int,
    rootfs: Path,
    workspace_dir: Path,
    cgroups_path: str,
    memory_limit_bytes: int,
    pids_limit: int,
    seccomp: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The OCI config of one sandbox built from ``spec`` (see the module docstring), its
    mounts rendered from its mount ``plan`` (:func:`execbox.isolation.rootfs.mount_plan`).

    ``rootfs`` is a read-only skeleton holding the plan's mount points and symlinks
    (:func:`make_mount_points`); ``workspace_dir`` is the host directory (a size-capped
    tmpfs) seen read-write at the workspace in place of the plan's workspace tmpfs. ``memory_limit_bytes`` includes the sentry's own memory;
    ``pids_limit`` is a backstop only (gVisor counts its own threads), processes are
    contained by ``RLIMIT_NPROC`` = ``spec.pids_max``.
    """
    mounts = oci_mounts(plan, host_dirs={WORKSPACE: workspace_dir})
    env = {**spec.env, CONTROL_FD_ENV: str(_CONTROL_FD), EVENTS_FD_ENV: str(_EVENTS_FD)}
    linux = _linux(spec, cgroups_path, memory_limit_bytes, pids_limit)
    if seccomp is not None:
        linux["seccomp"] = dict(seccomp)
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": uid, "gid": uid, "additionalGids": []},
            "args": [*CHANNEL_SHELL, *spec.runtime.argv()],
            "env": [f"{k}={v}" for k, v in env.items()],
            "cwd": WORKSPACE,
            "capabilities": _NO_CAPABILITIES,
            "noNewPrivileges": True,
            "rlimits": [
                {"type": "RLIMIT_CORE", "soft": 0, "hard": 0},
                {"type": "RLIMIT_FSIZE", "soft": spec.file_size_max_bytes, "hard": spec.file_size_max_bytes},
                {"type": "RLIMIT_NOFILE", "soft": spec.open_files_max, "hard": spec.open_files_max},
                {"type": "RLIMIT_NPROC", "soft": spec.pids_max, "hard": spec.pids_max},
            ],
        },
        "root": {"path": str(rootfs), "readonly": True},
        "hostname": "sandbox",
        "mounts": mounts,
        "linux": linux,
    }


def probe_config(
    rootfs: Path, uid: int, seccomp: Mapping[str, Any] | None, plan: Sequence[PlanStep] | None = None
) -> dict[str, Any]:
    """A tiny sandbox running ``uname`` (prints ``Linux``), to test runsc for real; its file
    system is ``plan`` (by default the host's programs, :func:`~execbox.isolation.rootfs.system_steps`),
    whose mount points and links the caller makes (:func:`make_mount_points`).

    With ``seccomp``, uname(2) is forbidden as well: a probe that still prints ``Linux``
    means runsc ignored the profile.
    """
    linux: dict[str, Any] = {"namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount")]}
    if seccomp is not None:
        probe_rule = {"names": ["uname"], "action": "SCMP_ACT_ERRNO"}
        linux["seccomp"] = {**seccomp, "syscalls": [*seccomp["syscalls"], probe_rule]}
    return {
        "ociVersion": "1.0.2",
        "process": {
            "user": {"uid": uid, "gid": uid},
            "args": ["/usr/bin/uname"],
            "env": ["PATH=/usr/bin"],
            "cwd": "/",
            "capabilities": _NO_CAPABILITIES,
            "noNewPrivileges": True,
        },
        "root": {"path": str(rootfs), "readonly": True},
        "mounts": oci_mounts(system_steps() if plan is None else plan),
        "linux": linux,
    }


# -- the root skeleton (host I/O) -----------------------------------------------------


def prepare_rootfs(directory: Path) -> Path:
    """Create (in place, idempotently) the shared read-only root skeleton of every bundle
    under ``directory`` with the mount points of what no plan holds (the two walls' zygote
    and export directory, ``/sys``); each plan's own are made by :func:`make_mount_points`."""
    rootfs = directory / "rootfs"
    for target in ("sys", EXPORT_DIR, ZYGOTE_DIR):
        (rootfs / target.lstrip("/")).mkdir(parents=True, exist_ok=True)
    (rootfs / ZYGOTE_DIR.lstrip("/") / "zygote.py").touch()
    return rootfs


def make_mount_points(rootfs: Path, plan: Sequence[PlanStep]) -> None:
    """What ``plan`` mounts over or links must exist in the read-only skeleton ``rootfs``:
    a directory (a file, for a bind of a file) per mount target, its symlinks. Targets
    inside an earlier mount are left to that mount (the minimal /etc holds its own mount
    points). Safe to run concurrently and again."""
    mounted: list[str] = []
    for step in plan:
        if any(step.target.startswith(f"{outer.rstrip('/')}/") for outer in mounted):
            continue
        path = rootfs / step.target.lstrip("/")
        if step.op is Op.SYMLINK:
            if not path.is_symlink():
                with contextlib.suppress(FileExistsError):
                    path.symlink_to(step.source)
            continue
        mounted.append(step.target)
        if step.is_bind and not Path(step.source).is_dir():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
        else:
            path.mkdir(parents=True, exist_ok=True)


def build_host_config(
    spec: SandboxSpec,
    *,
    plan: Sequence[PlanStep],
    rootfs: Path,
    zygote: Path,
    export_dir: Path,
    argv: Sequence[str],
    env: Mapping[str, str],
    cgroups_path: str,
    memory_limit_bytes: int,
    pids_limit: int,
) -> dict[str, Any]:
    """The OCI config of a long-lived gVisor sandbox whose first process is the fork server
    (the two walls): root *inside gVisor only*, with the few capabilities the inner wall
    needs to build namespaces, mounts and drop to a sandbox uid; every bind of the inner
    wall's mount ``plan`` (so the inner plan can bind them again from inside), the zygote,
    a scratch ``/tmp`` and the host directory artifacts are exported to."""
    mounts = [
        *oci_mounts([PlanStep(Op.PROC, "/proc"), PlanStep(Op.DEV, "/dev")]),
        _tmpfs("/tmp", _HOST_TMP_BYTES, mode="0700"),
        *oci_mounts([step for step in plan if step.op is Op.RO_BIND]),
        *oci_mounts([step for step in plan if step.op is Op.BIND]),
        _bind(zygote, f"{ZYGOTE_DIR}/zygote.py"),
        _bind(export_dir, EXPORT_DIR, writable=True),
    ]
    capabilities = {k: list(_HOST_CAPABILITIES) for k in ("bounding", "effective", "permitted")}
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0, "additionalGids": []},
            "args": list(argv),
            "env": [f"{k}={v}" for k, v in env.items()],
            "cwd": "/",
            "capabilities": {**_NO_CAPABILITIES, **capabilities},
            "noNewPrivileges": True,
            "rlimits": [
                {"type": "RLIMIT_CORE", "soft": 0, "hard": 0},
                {"type": "RLIMIT_NOFILE", "soft": 4096, "hard": 4096},
            ],
        },
        "root": {"path": str(rootfs), "readonly": True},
        "hostname": "sandbox",
        "mounts": mounts,
        "linux": _linux(spec, cgroups_path, memory_limit_bytes, pids_limit),
    }


# -- seccomp -------------------------------------------------------------------------


def load_docker_profile(path: Path) -> dict[str, Any]:
    """Read a Docker-format seccomp profile; raises SeccompProfileError naming the file."""
    try:
        profile = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SeccompProfileError(f"cannot read the seccomp profile {path}: {exc}") from exc
    if not isinstance(profile, dict) or "defaultAction" not in profile:
        raise SeccompProfileError(f"{path} is not a Docker seccomp profile (no defaultAction)")
    return profile


def _action(action: str, where: str) -> str:
    try:
        return _ACTIONS[action]
    except KeyError:
        raise SeccompProfileError(f"seccomp action {action} ({where}) is not supported by runsc") from None


def _applies(rule: Mapping[str, Any], docker_arch: str) -> bool:
    """Docker's includes/excludes: the sandbox has no capabilities and runs on ``docker_arch``."""
    includes, excludes = rule.get("includes") or {}, rule.get("excludes") or {}
    if includes.get("caps"):
        return False
    if includes.get("arches") and docker_arch not in includes["arches"]:
        return False
    return not (excludes.get("arches") and docker_arch in excludes["arches"])


def docker_profile_to_oci(
    profile: Mapping[str, Any], machine: str | None = None
) -> tuple[dict[str, Any], list[str]]:
    """Translate a Docker profile into an OCI ``linux.seccomp`` section for this runsc.

    Returns the section and notes describing every rule that had to change.
    """
    machine = machine or platform.machine()
    if machine not in _ARCHES:
        raise SeccompProfileError(f"no seccomp architecture known for {machine}")
    docker_arch, scmp_arch = _ARCHES[machine]
    notes: list[str] = []
    default = _action(profile["defaultAction"], "defaultAction")
    if default == "SCMP_ACT_ERRNO" and profile.get("defaultErrnoRet", errno.EPERM) != errno.EPERM:
        raise SeccompProfileError("defaultErrnoRet other than EPERM: this runsc always returns EPERM")
    arches = list(profile.get("architectures") or [])
    for entry in profile.get("archMap") or []:
        if entry.get("architecture") == scmp_arch:
            arches = [scmp_arch, *entry.get("subArchitectures", [])]
    rules = []
    for index, rule in enumerate(profile.get("syscalls") or []):
        names = list(rule.get("names") or ([rule["name"]] if rule.get("name") else []))
        where = f"rule {index} ({', '.join(names[:3])}{'...' if len(names) > 3 else ''})"
        if not names or not _applies(rule, docker_arch):
            continue
        action = _action(rule["action"], where)
        if action != rule["action"]:
            notes.append(f"{where}: {rule['action']} is applied as {action} (this runsc lacks the former)")
        out: dict[str, Any] = {"names": names, "action": action}
        if action == "SCMP_ACT_ERRNO":
            wanted = rule.get("errnoRet", errno.EPERM)
            if wanted == errno.ENOSYS:
                notes.append(f"{where}: ENOSYS rule dropped (this runsc cannot return it; the sentry answers itself)")
                continue
            if wanted != errno.EPERM:
                raise SeccompProfileError(
                    f"seccomp {where} returns errno {wanted}; this runsc ignores errnoRet and would return EPERM"
                )
        if rule.get("args"):
            out["args"] = [
                {k: arg[k] for k in ("index", "value", "valueTwo", "op") if k in arg} for arg in rule["args"]
            ]
        rules.append(out)
    section: dict[str, Any] = {"defaultAction": default, "syscalls": rules}
    if arches:
        section["architectures"] = arches
    return section, notes
