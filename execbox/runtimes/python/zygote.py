"""execbox Python fork server ("zygote"): runs on the host as root, never runs user code.

Started once per service with the runtime environment's interpreter, it imports the
preloaded modules (numpy, pandas, ...) and then serves ``spawn`` requests on a
SOCK_SEQPACKET socket. For each it clones a child straight into fresh PID, mount,
network, IPC and UTS namespaces. The child, before any user code exists:

1. joins its cgroup (the host created it) and then a fresh cgroup namespace;
2. builds its file system from the host's mount plan (read-only binds, tmpfs
   workspace, /tmp, /dev/shm, a minimal /dev, its own /proc), pivots into it and
   remounts the root read-only;
3. sets its rlimits, empties its capability bounding set, drops to the sandbox's
   unprivileged uid/gid (which clears every capability), sets no_new_privs and loads the seccomp filter;
4. keeps only its four channel fds (stdin is /dev/null) and forks the driver, staying
   behind as the sandbox's init (pid 1 reaps, and ends with the driver's status).

So a fresh sandbox costs about a fork, and ``import pandas`` in user code costs nothing.
The zygote holds no secret: its environment is the sandbox's and its only fd is the socket.

Socket messages (JSON, one per datagram): host -> zygote ``{"op": "init", ...}`` once, then
``{"op": "spawn", "id", "uid", "cgroups": [paths], "rlimits": {...}}`` with four fds
(control, events, stdout, stderr); zygote -> host ``{"op": "ready"}``,
``{"op": "spawned", "id", "pid"}`` / ``{"op": "error", "id", "message"}`` and
``{"op": "exit", "pid", "status"}`` (a raw wait status) whenever a child ends.
"""

import base64
import ctypes
import errno
import gc
import json
import os
import resource
import select
import signal
import socket
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
import driver  # noqa: E402  (the same driver the bwrap sandboxes run)

sys.path.remove(_HERE)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)
SYS_CLONE, SYS_PIVOT_ROOT = 56, 155  # x86_64
CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS, CLONE_NEWIPC = 0x20000, 0x2000000, 0x4000000, 0x8000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = (
    1, 2, 4, 8, 32, 4096, 16384, 1 << 18)
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 1, 24, 38, 22, 2
_DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
_RLIMITS = {"nproc": resource.RLIMIT_NPROC, "core": resource.RLIMIT_CORE,
            "fsize": resource.RLIMIT_FSIZE, "nofile": resource.RLIMIT_NOFILE}


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _check(result, what):
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def _mount(source, target, fstype, flags, data=None):
    enc = lambda v: v.encode() if isinstance(v, str) else v  # noqa: E731
    _check(_libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")


def _ro_bind(source, target, writable=False):
    if os.path.isdir(source):
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        open(target, "a").close()
    _mount(source, target, None, MS_BIND | MS_REC)
    if not writable:
        _mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)


def _build_root(root, plan, uid):
    """Build the sandbox's file system under ``root`` from the host's mount plan, then pivot."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    for op, a, b in plan:
        target = root + (b if op in ("ro-bind", "bind", "symlink") else a)
        if op == "symlink":
            os.symlink(a, target)
        elif op in ("ro-bind", "bind"):
            _ro_bind(a, target, writable=op == "bind")
        elif op == "tmpfs":
            os.makedirs(target, exist_ok=True)
            _mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV, f"size={b},mode=0700")
            os.chown(target, uid, uid)
        elif op == "proc":
            os.makedirs(target, exist_ok=True)
            _mount("proc", target, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        elif op == "dev":
            os.makedirs(target, exist_ok=True)
            _mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NOEXEC, "size=64k,mode=0755")
            for name in _DEVICES:
                if os.path.exists(f"/dev/{name}"):
                    open(f"{target}/{name}", "a").close()
                    _mount(f"/dev/{name}", f"{target}/{name}", None, MS_BIND)
            for name, link in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                               ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
                os.symlink(link, f"{target}/{name}")
    os.chdir(root)
    _check(_libc.syscall(SYS_PIVOT_ROOT, b".", b"."), "pivot_root")
    _check(_libc.umount2(b".", MNT_DETACH), "umount old root")
    os.chdir("/")
    _mount(None, "/", None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)


def _child(config, request, fds):
    """In the cloned child (pid 1 of its namespaces): isolate, then become the driver."""
    control, events, stdout, stderr = fds
    for path in request["cgroups"]:
        with open(path, "w") as fh:
            fh.write("0")
    _check(_libc.unshare(CLONE_NEWCGROUP), "unshare cgroup namespace")
    uid = request["uid"]
    _build_root(config["root"], config["plan"], uid)
    _check(_libc.sethostname(b"sandbox", 7), "sethostname")
    for name, value in request["rlimits"].items():
        resource.setrlimit(_RLIMITS[name], (value, value))
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(stdout, 1)
    os.dup2(stderr, 2)
    keep = {0, 1, 2, control, events}
    for fd in map(int, os.listdir("/proc/self/fd")):
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass
    for cap in range(64):  # empty the bounding set too: nothing can ever regain a capability
        if _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) < 0 and ctypes.get_errno() == errno.EINVAL:
            break
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)  # from root to a plain uid: every capability is dropped
    _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "parent-death signal")
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    bpf = config["filter"]
    buf = ctypes.create_string_buffer(bpf, len(bpf))
    prog = _SockFprog(len(bpf) // 8, ctypes.cast(buf, ctypes.c_void_p))
    _check(_libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0), "seccomp")
    os.chdir("/workspace")
    driver_pid = os.fork()  # the program must not be pid 1, whose signals the kernel filters
    if driver_pid == 0:
        sys.stdin = open(0, "r", closefd=False)
        sys.stdout = open(1, "w", encoding="utf-8", errors="backslashreplace", closefd=False)
        sys.stderr = open(2, "w", encoding="utf-8", errors="backslashreplace", closefd=False)
        os.environ.clear()
        os.environ.update(config["env"])
        driver.serve(control, events)
        os._exit(0)
    _init(driver_pid, (control, events, 0, 1, 2))


def _init(driver_pid, fds):
    """pid 1 of the sandbox: reap every process; end with the driver's status as bwrap does
    (its exit code, or 128 + the signal that killed it); its end ends the namespace."""
    for fd in fds:
        os.close(fd)
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            os._exit(0)
        except InterruptedError:
            continue
        if pid == driver_pid:
            os._exit(128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status))


def _spawn(config, request, fds):
    flags = CLONE_NEWPID | CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC
    if not config["network"]:
        flags |= CLONE_NEWNET
    pid = _libc.syscall(SYS_CLONE, flags | signal.SIGCHLD, 0, 0, 0, 0)
    if pid == 0:
        code = 125
        try:
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            _child(config, request, fds)
            code = 0
        except BaseException as exc:  # never return into the zygote's loop
            try:
                os.write(fds[3], f"execbox: sandbox setup failed: {exc}\n".encode())
            except OSError:
                pass
        finally:
            os._exit(code)
    if pid < 0:
        raise OSError(ctypes.get_errno(), "clone failed")
    return pid


def _send(sock, message):
    sock.send(json.dumps(message).encode())


def main():
    _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "parent-death signal")
    sock = socket.socket(fileno=int(os.environ.pop("EXECBOX_ZYGOTE_FD")))
    children = set()
    config = json.loads(sock.recv(1 << 22))
    config["filter"] = base64.b64decode(config["filter"])
    os.environ.clear()
    os.environ.update(config["env"])
    os.environ["EXECBOX_PRELOAD"] = config.get("preload", "")
    # matplotlib, if preloaded, reads the font cache prepared by `execbox build` (never the host's /tmp)
    if os.environ.get("EXECBOX_MPL_CACHE"):
        os.environ["MPLCONFIGDIR"] = os.environ["EXECBOX_MPL_CACHE"]
    driver.preload()
    os.nice(config.get("nice", 0))  # clones and their set-up yield to running programs
    gc.collect()
    gc.freeze()  # preloaded objects stay out of the children's collections: fewer copy-on-write faults
    os.environ.clear()
    os.environ.update(config["env"])
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.set_wakeup_fd(wake_w)
    _send(sock, {"op": "ready"})
    while True:
        try:
            readable, _, _ = select.select([sock, wake_r], [], [])
        except InterruptedError:
            continue
        if wake_r in readable:
            while True:
                try:
                    os.read(wake_r, 4096)
                except BlockingIOError:
                    break
            while True:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid == 0:
                    break
                children.discard(pid)
                _send(sock, {"op": "exit", "pid": pid, "status": status})
        if sock in readable:
            try:
                data, fds, _, _ = socket.recv_fds(sock, 1 << 20, 4)
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                raise
            if not data:  # the service went away: so do the sandboxes
                for pid in children:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass
                return
            request = json.loads(data)
            try:
                pid = _spawn(config, request, fds)
                children.add(pid)
                _send(sock, {"op": "spawned", "id": request["id"], "pid": pid})
            except Exception as exc:
                _send(sock, {"op": "error", "id": request["id"], "message": str(exc)})
            finally:
                for fd in fds:
                    os.close(fd)


if __name__ == "__main__":
    main()
