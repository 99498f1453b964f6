"""Escape: kernel interfaces an escape needs (mount, ptrace, namespaces, bpf, keys...).

Each is called through ctypes with harmless arguments. The namespaces backend's seccomp
filter kills the program (SIGSYS, verdict ``unauthorized_access`` / ``disallowed_syscall``,
exit -31). gVisor emulates or refuses some of them with an errno instead, so for other
backends the test asserts containment only: the call failed (or the program was killed),
the host is unaffected, and the next execution works.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from execbox.models import ExecutionResult, Status, UnauthorizedAccessType

if TYPE_CHECKING:
    from tests.conftest import SandboxRunner

#: syscall numbers for the calls without a glibc wrapper (or with a risky one)
SYSCALL_NUMBERS = {
    "x86_64": {
        "bpf": 321, "perf_event_open": 298, "keyctl": 250, "add_key": 248, "kexec_load": 246,
        "finit_module": 313, "userfaultfd": 323, "pivot_root": 155, "open_tree": 428, "fsopen": 430,
        "process_vm_readv": 310, "kcmp": 312, "syslog": 103, "acct": 163, "swapon": 167,
        "open_by_handle_at": 304,
    },
    "aarch64": {
        "bpf": 280, "perf_event_open": 241, "keyctl": 219, "add_key": 217, "kexec_load": 104,
        "finit_module": 273, "userfaultfd": 282, "pivot_root": 41, "open_tree": 428, "fsopen": 430,
        "process_vm_readv": 270, "kcmp": 272, "syslog": 116, "acct": 89, "swapon": 224,
        "open_by_handle_at": 265,
    },
}

#: name -> Python expression run with ``libc`` (ctypes CDLL) and ``host_pid`` in scope
LIBC_CALLS = {
    "mount tmpfs": 'libc.mount(b"none", b"/tmp", b"tmpfs", 0, None)',
    "mount bind /": 'libc.mount(b"/", b"/tmp", None, 0x1000, None)',  # MS_BIND
    "umount2 /usr": 'libc.umount2(b"/usr", 2)',  # MNT_DETACH
    "ptrace attach host pid": "libc.ptrace(16, host_pid, None, None)",  # PTRACE_ATTACH
    "ptrace attach pid 1": "libc.ptrace(16, 1, None, None)",
    "ptrace traceme": "libc.ptrace(0, 0, None, None)",
    "unshare user": "libc.unshare(0x10000000)",  # CLONE_NEWUSER
    "unshare mount": "libc.unshare(0x00020000)",  # CLONE_NEWNS
    "unshare net": "libc.unshare(0x40000000)",  # CLONE_NEWNET
    "setns": 'libc.setns(os.open("/proc/self/ns/mnt", os.O_RDONLY), 0)',
    "chroot": 'libc.chroot(b"/tmp")',
}
#: calls that a user-space kernel (gVisor) may legitimately allow *inside* its sandbox
MAY_SUCCEED_INSIDE_A_USER_SPACE_KERNEL = {"unshare user", "unshare mount", "unshare net", "setns", "ptrace traceme"}


def _program(expression: str) -> str:
    return f"""
import ctypes, os

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
host_pid = {os.getpid()}

def main():
    print("calling", flush=True)
    rc = {expression}
    return {{"rc": rc, "errno": ctypes.get_errno()}}
"""


def _assert_refused(executor: SandboxRunner, result: ExecutionResult, name: str) -> None:
    if executor.inner_wall:
        # the seccomp filter kills the program: a verdict, not a crash of the driver
        assert result.status is Status.UNAUTHORIZED_ACCESS, executor.describe(result)
        assert result.unauthorized_access_type is UnauthorizedAccessType.DISALLOWED_SYSCALL
        assert result.exit_code == -31
        assert result.stdout == "calling\n"  # output before the call is kept
        return
    if result.status is Status.SUCCESS:
        value = result.result.value  # type: ignore[union-attr]
        if name not in MAY_SUCCEED_INSIDE_A_USER_SPACE_KERNEL:
            assert value["rc"] == -1, f"{name} succeeded inside the sandbox: {value}"
    else:
        assert result.status in (Status.UNAUTHORIZED_ACCESS, Status.RUNTIME_ERROR, Status.PROGRAM_ERROR), (
            executor.describe(result)
        )


def _host_tracer_pid() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("TracerPid:"):
            return int(line.split()[1])
    raise AssertionError("no TracerPid in /proc/self/status")


@pytest.mark.parametrize("name", sorted(LIBC_CALLS))
def test_libc_call_is_refused(executor: SandboxRunner, name: str) -> None:
    mounts_before = Path("/proc/self/mountinfo").read_text().count(" /tmp ")
    result = executor.run(_program(LIBC_CALLS[name]))
    _assert_refused(executor, result, name)
    assert _host_tracer_pid() == 0, "the test process is being traced"
    assert Path("/proc/self/mountinfo").read_text().count(" /tmp ") == mounts_before
    executor.assert_still_works(("python",))


@pytest.mark.parametrize("name", sorted(SYSCALL_NUMBERS["x86_64"]))
def test_raw_syscall_is_refused(executor: SandboxRunner, name: str) -> None:
    numbers = SYSCALL_NUMBERS.get(platform.machine())
    if numbers is None:
        pytest.skip(f"no syscall numbers for {platform.machine()} in this test")
    # every argument zero/NULL: if a call got through it would fail with EFAULT/EINVAL/EPERM
    result = executor.run(_program(f"libc.syscall({numbers[name]}, 0, 0, 0, 0, 0)"))
    _assert_refused(executor, result, name)


def test_driver_survives_seccomp_denial_in_a_child(executor: SandboxRunner) -> None:
    # a forked child makes the forbidden call; the parent (and the driver) must carry on
    result = executor.run(
        """
        import ctypes, os

        def main():
            pid = os.fork()
            if pid == 0:
                libc = ctypes.CDLL(None, use_errno=True)
                libc.unshare(0x10000000)
                libc.mount(b"none", b"/tmp", b"tmpfs", 0, None)
                os._exit(0)
            _, status = os.waitpid(pid, 0)
            return {"signalled": os.WIFSIGNALED(status), "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None}
        """
    )
    assert result.status is Status.SUCCESS, executor.describe(result)
    if executor.inner_wall:
        assert result.result is not None and result.result.value == {"signalled": True, "signal": 31}
    executor.assert_still_works()


def test_nodejs_cannot_spawn_a_privileged_helper(executor: SandboxRunner) -> None:
    # no setuid helper works inside (no_new_privs, nosuid): mount / unshare via the shell fail
    result = executor.run(
        """
        const cp = require('child_process');
        function run(cmd, args) {
          try { cp.execFileSync(cmd, args, { stdio: 'pipe' }); return 'ok'; }
          catch (e) { return 'failed: ' + (e.status === null ? e.signal : e.status); }
        }
        function main() {
          return {
            mount: run('/usr/bin/mount', ['-t', 'tmpfs', 'none', '/tmp']),
            unshare: run('/usr/bin/unshare', ['-r', '/usr/bin/true']),
            su: run('/usr/bin/su', ['-c', 'true']),
          };
        }
        """,
        "nodejs",
    )
    assert result.status is Status.SUCCESS, executor.describe(result)
    for command, outcome in result.result.value.items():  # type: ignore[union-attr]
        if executor.inner_wall or command != "unshare":
            assert outcome.startswith("failed"), f"{command} worked inside the sandbox: {outcome}"
    executor.assert_still_works(("python", "nodejs"))
