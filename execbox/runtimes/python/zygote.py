"""execbox Python fork server ("zygote"): runs on the host as root, never runs user code.

Started once per service with the runtime environment's interpreter, it first forks a
small *init factory*, then imports the preloaded modules (numpy, pandas, ...) and serves
``spawn`` requests on a SOCK_SEQPACKET socket. For each sandbox:

* the factory clones an init straight into fresh PID, mount, network, IPC and UTS
  namespaces: pid 1 of the sandbox, which reaps orphans until the host kills it (its death
  ends the namespaces and everything in them); it drops to uid 65534;
* the zygote joins those namespaces with setns and forks the driver-to-be into them (pid 2),
  then returns to its own. The fork, before any user code exists:

  1. joins its cgroup (the host created it) and then a fresh cgroup namespace;
  2. builds its file system from the host's mount plan (read-only binds, tmpfs
     workspace, /tmp, /dev/shm, a minimal /dev, its own /proc), pivots into it and
     remounts the root read-only;
  3. sets its rlimits, empties its capability bounding set, drops to the sandbox's
     unprivileged uid/gid (which clears every capability), sets no_new_privs and loads
     the seccomp filter;
  4. keeps only its four channel fds (stdin is /dev/null) and becomes the driver.

So a fresh sandbox costs about one fork of the zygote (plus a clone of the small factory),
``import pandas`` in user code costs nothing, and the program is not pid 1 (whose signals
the kernel filters). The zygote holds no secret: its environment is the sandbox's and its
only fds are its sockets and its own namespaces.

Socket messages (JSON, one per datagram): host -> zygote ``{"op": "init", ...}`` once, then
``{"op": "spawn", "id", "uid", "cgroups": [paths], "rlimits": {...}}`` with four fds
(control, events, stdout, stderr); zygote -> host ``{"op": "ready"}``,
``{"op": "spawned", "id", "pid", "init"}`` / ``{"op": "error", "id", "message"}`` and
``{"op": "exit", "pid", "status"}`` (the driver's raw wait status) whenever a driver ends.
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
    """In the forked child (pid 2 of the sandbox's namespaces): isolate, then become the driver."""
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
    sys.stdin = open(0, "r", closefd=False)
    sys.stdout = open(1, "w", encoding="utf-8", errors="backslashreplace", closefd=False)
    sys.stderr = open(2, "w", encoding="utf-8", errors="backslashreplace", closefd=False)
    os.environ.clear()
    os.environ.update(config["env"])
    driver.serve(control, events)


def _clone(flags):
    """fork(2) with namespace flags (raw clone: Python has no API for it)."""
    pid = _libc.syscall(SYS_CLONE, flags | signal.SIGCHLD, 0, 0, 0, 0)
    if pid < 0:
        raise OSError(ctypes.get_errno(), "clone failed")
    return pid


def _init_process():
    """pid 1 of one sandbox: reaps orphans until the host kills it (which ends the namespaces)."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing the sandbox mounts reaches the host
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
    os.setgroups([])
    os.setresgid(65534, 65534, 65534)
    os.setresuid(65534, 65534, 65534)
    _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "parent-death signal")  # after setuid
    while True:
        signal.sigwaitinfo({signal.SIGCHLD})
        while True:
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    break
            except ChildProcessError:
                break


def _reaped():
    """(pid, raw status) of every child that has ended, without blocking."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        yield pid, status


def _kill_all(pids):
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _init_factory(sock, flags):
    """A small process (forked before the preload) that clones one init per sandbox."""
    _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "parent-death signal")
    inits = set()
    while True:
        request = sock.recv(64)
        inits.difference_update(pid for pid, _ in _reaped())  # the inits of destroyed sandboxes
        if not request:
            _kill_all(inits)
            os._exit(0)
        try:
            pid = _clone(flags)
        except OSError as exc:
            sock.send(json.dumps({"error": str(exc)}).encode())
            continue
        if pid == 0:
            try:
                sock.close()
                _init_process()
            finally:
                os._exit(1)
        inits.add(pid)
        sock.send(json.dumps({"init": pid}).encode())


def _setns(fd, what):
    _check(_libc.setns(fd, 0), f"setns {what}")


def _spawn(config, request, fds, factory, own_ns):
    """An init in fresh namespaces (from the factory), then the driver forked into them."""
    factory.send(b"spawn")
    reply = json.loads(factory.recv(256))
    if "init" not in reply:
        raise OSError(f"init factory: {reply.get('error')}")
    init_pid = reply["init"]
    targets = [(os.open(f"/proc/{init_pid}/ns/{ns}", os.O_RDONLY | os.O_CLOEXEC), ns) for ns in own_ns]
    try:
        for fd, ns in targets:
            _setns(fd, ns)  # pid: for the next child only; the others: this process, until restored
        pid = os.fork()
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
    finally:
        for fd, _ in targets:
            os.close(fd)
        for ns, fd in own_ns.items():
            _setns(fd, ns)
    return pid, init_pid


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
    flags = CLONE_NEWPID | CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | (0 if config["network"] else CLONE_NEWNET)
    namespaces = ["pid", "mnt", "ipc", "uts"] + ([] if config["network"] else ["net"])
    own_ns = {ns: os.open(f"/proc/self/ns/{ns}", os.O_RDONLY | os.O_CLOEXEC) for ns in namespaces}
    os.nice(config.get("nice", 0))  # clones and their set-up yield to running programs
    factory, factory_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    if os.fork() == 0:  # before the preload: each init is a clone of a small process
        try:
            sock.close()
            factory.close()
            _init_factory(factory_end, flags)
        finally:
            os._exit(1)
    factory_end.close()
    os.environ["EXECBOX_PRELOAD"] = config.get("preload", "")
    # matplotlib, if preloaded, reads the font cache prepared by `execbox build` (never the host's /tmp)
    if os.environ.get("EXECBOX_MPL_CACHE"):
        os.environ["MPLCONFIGDIR"] = os.environ["EXECBOX_MPL_CACHE"]
    driver.preload()
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
            for pid, status in _reaped():
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
                _kill_all(children)
                return
            request = json.loads(data)
            try:
                pid, init_pid = _spawn(config, request, fds, factory, own_ns)
                children.add(pid)
                _send(sock, {"op": "spawned", "id": request["id"], "pid": pid, "init": init_pid})
            except Exception as exc:
                _send(sock, {"op": "error", "id": request["id"], "message": str(exc)})
            finally:
                for fd in fds:
                    os.close(fd)


if __name__ == "__main__":
    main()
