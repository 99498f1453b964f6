"""The built-in syscall filter of the namespaces backend (libseccomp through pyseccomp).

Default allow, with three kinds of denial:

* kill the process (verdict ``disallowed_syscall``, seen as SIGSYS): syscalls that only
  an escape or a host attack needs — ptrace, mount family, namespaces, bpf, keyrings,
  perf, kexec and modules, reboot, clock setting, handle-based opens, userfaultfd,
  cross-process memory access, and ``clone`` with namespace flags;
* fail with ENOSYS, so that runtimes fall back cleanly: ``io_uring_*`` (libuv uses it
  when present) and ``clone3`` (glibc then uses ``clone``, whose flags can be checked);
* fail with EAFNOSUPPORT: ``socket``/``socketpair`` of any family but AF_UNIX, or with
  egress (``inet``) any family but AF_UNIX, AF_INET and AF_INET6: the sandbox's network
  namespace then has a loopback interface only, where the driver's bridge to the egress
  proxy listens.

Architectures other than the native one are killed (no x32 / i386 side door).

The kill action is SECCOMP_RET_KILL_PROCESS, which libseccomp uses only at API level 3 or
above. It finds the level by asking the kernel (SECCOMP_GET_ACTION_AVAIL); gVisor's
kernel does not answer, so libseccomp says level 2 there and refuses the filter. The
level is then raised to 3 (the action exists since Linux 4.14, and gVisor applies it):
a kernel that really lacked it would refuse the filter when a sandbox loads it, and the
backend's start-up check loads it for real.
"""

from __future__ import annotations

import errno
import functools
import socket
import tempfile

from execbox.errors import BackendUnavailableError

__all__ = ["KILLED_SYSCALLS", "NAMESPACE_CLONE_FLAGS", "filter_bpf", "syscall_number"]

KILLED_SYSCALLS: tuple[str, ...] = (
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp",
    "mount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree", "fsopen", "fsconfig",
    "fsmount", "fspick", "mount_setattr",
    "unshare", "setns",
    "bpf", "perf_event_open", "userfaultfd",
    "keyctl", "add_key", "request_key",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "reboot", "swapon", "swapoff", "acct", "quotactl", "syslog", "vhangup",
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex",
    "open_by_handle_at", "name_to_handle_at", "lookup_dcookie", "fanotify_init",
    "iopl", "ioperm", "uselib", "personality",
)
_ENOSYS_SYSCALLS = ("io_uring_setup", "io_uring_enter", "io_uring_register", "clone3")
#: CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET (clone's low byte is the exit signal)
NAMESPACE_CLONE_FLAGS = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000)


def syscall_number(name: str) -> int:
    """The native architecture's number of syscall ``name``, from libseccomp."""
    try:
        import pyseccomp as sc

        return int(sc.resolve_syscall(sc.Arch.NATIVE, name))
    except (ImportError, OSError, RuntimeError, ValueError) as exc:
        raise BackendUnavailableError(f"libseccomp does not know the syscall {name}: {exc}") from exc


def _refuse_families(flt: object, inet: bool) -> None:
    """socket/socketpair of a refused family fail with EAFNOSUPPORT (see the module docstring)."""
    import pyseccomp as sc

    refused = sc.ERRNO(errno.EAFNOSUPPORT)
    for name in ("socket", "socketpair"):
        if not inet:
            flt.add_rule(refused, name, sc.Arg(0, sc.NE, socket.AF_UNIX))  # type: ignore[attr-defined]
            continue
        # AF_UNSPEC, the families between AF_INET and AF_INET6, and every one above AF_INET6
        for family in (0, *range(socket.AF_INET + 1, socket.AF_INET6)):
            flt.add_rule(refused, name, sc.Arg(0, sc.EQ, family))  # type: ignore[attr-defined]
        flt.add_rule(refused, name, sc.Arg(0, sc.GT, socket.AF_INET6))  # type: ignore[attr-defined]


@functools.cache
def filter_bpf(inet: bool) -> bytes:
    """The filter compiled to BPF (once per process: it depends only on ``inet`` and the
    host); ``inet`` also allows AF_INET and AF_INET6 sockets (egress)."""
    try:
        import pyseccomp as sc

        if sc.get_api() < 3:  # see the module docstring (gVisor)
            sc.set_api(3)
        flt = sc.SyscallFilter(defaction=sc.ALLOW)
        for name in KILLED_SYSCALLS:
            try:
                flt.add_rule(sc.KILL_PROCESS, name)
            except (OSError, ValueError, RuntimeError):
                continue  # a syscall this architecture does not have
        for flag in NAMESPACE_CLONE_FLAGS:
            flt.add_rule(sc.KILL_PROCESS, "clone", sc.Arg(0, sc.MASKED_EQ, flag, flag))
        for name in _ENOSYS_SYSCALLS:
            flt.add_rule(sc.ERRNO(errno.ENOSYS), name)
        _refuse_families(flt, inet)
        with tempfile.TemporaryFile() as handle:  # libseccomp exports to a file descriptor
            flt.export_bpf(handle)
            handle.seek(0)
            return handle.read()
    except (ImportError, OSError, RuntimeError, ValueError) as exc:
        raise BackendUnavailableError(
            f"cannot build the seccomp filter ({exc}); install libseccomp2 (apt-get install libseccomp2) "
            "and the pyseccomp package"
        ) from exc
