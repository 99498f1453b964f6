"""execbox fork server ("zygote"): the inner sandbox, written once for every launcher.

It never runs user code itself. It runs either on the host as root (the ``namespaces``
backend's fork-server launcher) or as root *inside* a long-lived gVisor sandbox (the
``gvisor`` backend's two walls), where root means root of the sentry's kernel only.
It first forks a small *init factory*, then imports the preloaded modules (numpy,
pandas, ...) and serves requests on a SOCK_SEQPACKET socket. For each sandbox:

* the factory clones an init straight into fresh PID, mount, network, IPC and UTS
  namespaces: pid 1 of the sandbox, which reaps orphans until it is killed (its death
  ends the namespaces and everything in them); it drops to uid 65534;
* the zygote joins those namespaces with setns and forks the driver-to-be into them (pid 2),
  then returns to its own.

That is the *setns* mode. gVisor's kernel has no setns(2) for PID namespaces, so where
that call fails (probed at start: the zygote enters its own PID namespace) the zygote
runs in *unshare* mode, with no factory: for each sandbox it unshares a fresh PID
namespace for its next children, spawns a tiny init into it (pid 1, ``INIT_ARGV``, uid
65534) and forks the driver-to-be (pid 2), which unshares the other namespaces itself.
That is always the mode inside the ``gvisor`` backend's sandboxes, and the mode of the
``namespaces`` backend when execbox itself runs under gVisor (a pod under a gVisor
RuntimeClass). Either way, the fork, before any user code exists:

  1. joins its cgroup (on the host: the host created it) and then a fresh cgroup namespace;
     with egress (``config["loopback"]``) it brings up the loopback interface of its fresh
     network namespace (where the driver's bridge to the egress proxy listens);
  2. builds its file system from the mount plan (the spec's, then the spawn's own steps) (read-only binds, tmpfs workspace, /tmp,
     /dev/shm, a minimal /dev, its own /proc), pivots into it and remounts the root
     read-only;
  3. sets its rlimits, empties its capability bounding set, drops to the sandbox's
     unprivileged uid/gid (which clears every capability), sets no_new_privs and loads
     the seccomp filter;
  4. keeps only its four channel fds (stdin is /dev/null) and becomes the driver: the
     Python driver, imported once by the zygote, is called in place (``import pandas``
     in user code then costs nothing); any other runtime's driver is exec'd, with its
     channels at fds 3 and 4.

The zygote holds no secret: its environment is the sandbox's, its only fds are its
sockets, its namespaces and (inside gVisor) the channels of the one execution it serves
at a time. Its process title is a generic name, so a sandbox's ``/proc/1/cmdline``
shows no host path.

Socket messages (JSON, one per datagram): host -> zygote ``{"op": "init", ...}`` once
(answered ``{"op": "ready", "pidns": "setns" | "unshare"}``), then

* ``{"op": "spawn", "id", "uid", "cgroups": [paths], "rlimits": {...}, "plan"?: [steps]}`` with four fds
  (control, events, stdout, stderr) on the host; inside gVisor without fds: the
  channels passed to the sandbox at start (``config["channel"]``) are used;
* ``{"op": "kill", "id", "init", "pid"}``: SIGKILL the sandbox's init (and so its whole
  PID namespace); answered ``{"op": "killed", "id", "confirmed": bool}`` once the init is
  reaped (then no process of that sandbox is left; in unshare mode, once no process of
  its uid is left) and, inside gVisor, the control channel drained;
* ``{"op": "collect", "id", "pid"}`` (inside gVisor): copy the regular files directly
  under the sandbox's ``/workspace/artifacts`` (no symlink followed) into the export
  directory the host reads; answered ``{"op": "collected", "id", "count", "hwm_kb"}``
  with the driver's peak resident memory too (one round trip after a run);

zygote -> host: ``{"op": "spawned", "id", "pid", "init"}`` /
``{"op": "error", "id", "message"}``, and ``{"op": "exit", "pid", "status", "maxrss_kb",
"cpu_ms"}`` (the driver's raw wait status and usage) whenever a driver ends.
"""

import base64
import contextlib
import ctypes
import errno
import fcntl
import gc
import importlib.util
import json
import os
import resource
import select
import signal
import socket
import stat
import struct
import sys
import time

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)
CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS, CLONE_NEWIPC = 0x20000, 0x2000000, 0x4000000, 0x8000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = (
    1, 2, 4, 8, 32, 4096, 16384, 1 << 18)
MNT_DETACH = 2
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
_IFREQ = "16sH22x"  # struct ifreq: the name, then ifr_flags in the 24-byte union
PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 1, 24, 38, 22, 2
CAP_SETPCAP = 8
_DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
_RLIMITS = {"nproc": resource.RLIMIT_NPROC, "core": resource.RLIMIT_CORE,
            "fsize": resource.RLIMIT_FSIZE, "nofile": resource.RLIMIT_NOFILE}
_ARTIFACTS = "/workspace/artifacts"
#: pid 1 of a sandbox in unshare mode: a tiny reaper, as uid 65534, named sandbox-init, that
#: dies with the zygote (prctl(PR_SET_PDEATHSIG, SIGKILL), after the uid change that clears
#: it; the prctl syscall number is its argument)
INIT_ARGV = ("/usr/bin/perl", "-e",
             '$0 = "sandbox-init"; $( = $) = "65534 65534"; $< = $> = 65534; syscall($ARGV[0] + 0, 1, 9); '
             'while (1) { sleep 1 if wait() == -1 }')
_NOFOLLOW = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
#: syscall numbers, given by the host from libseccomp (never hard-coded for one architecture)
SYSCALLS = {}
#: unshare mode: each live sandbox's proc view (an fd of a mount namespace), by its driver's pid
_PROC_VIEWS = {}


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _check(result, what):
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def _set_title(title):
    """Overwrite this process's argv area, so that /proc/<pid>/cmdline shows ``title`` only
    (the technique of setproctitle, without its C extension: the zygote is stdlib only)."""
    try:
        with open("/proc/self/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
        start, end = int(fields[45]), int(fields[46])  # arg_start, arg_end (fields 48, 49)
        data = title.encode()[: end - start - 1]
        ctypes.memmove(start, data + b"\0" * (end - start - len(data)), end - start)
    except (OSError, ValueError, IndexError):
        pass  # cosmetic only


def _mount(source, target, fstype, flags, data=None):
    enc = lambda v: v.encode() if isinstance(v, str) else v  # noqa: E731
    _check(_libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")


def _mkdirs(path):
    """``mkdir -p`` with one system call per directory in the usual case (os.makedirs stats
    each one first; inside gVisor each call is a round trip to the sentry)."""
    try:
        os.mkdir(path, 0o755)
    except FileExistsError:
        pass
    except FileNotFoundError:
        _mkdirs(os.path.dirname(path))
        try:
            os.mkdir(path, 0o755)
        except FileExistsError:
            pass


def _ro_bind(source, target, writable=False):
    if os.path.isdir(source):
        _mkdirs(target)
    else:
        _mkdirs(os.path.dirname(target))
        os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644))
    _mount(source, target, None, MS_BIND | MS_REC)
    if not writable:
        _mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)


def _build_root(root, plan, uid):
    """Build the sandbox's file system under ``root`` from the mount plan, then pivot."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    for op, a, b in plan:
        target = root + (b if op in ("ro-bind", "bind", "symlink") else a)
        if op == "symlink":
            os.symlink(a, target)
        elif op in ("ro-bind", "bind"):
            _ro_bind(a, target, writable=op == "bind")
        elif op == "tmpfs":
            _mkdirs(target)
            _mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV, f"size={b},mode=0700")
            os.chown(target, uid, uid)
        elif op == "proc":
            _mkdirs(target)
            _mount("proc", target, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        elif op == "dev":
            _mkdirs(target)
            _mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NOEXEC, "size=64k,mode=0755")
            for name in _DEVICES:
                if os.path.exists(f"/dev/{name}"):
                    os.close(os.open(f"{target}/{name}", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644))
                    _mount(f"/dev/{name}", f"{target}/{name}", None, MS_BIND)
            for name, link in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                               ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
                os.symlink(link, f"{target}/{name}")
    _pivot_into(root)
    _mount(None, "/", None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)


def _pivot_into(root):
    """Make ``root`` this process's root (pivot_root), the old root detached."""
    os.chdir(root)
    _check(_libc.syscall(SYSCALLS["pivot_root"], b".", b"."), "pivot_root")
    _check(_libc.umount2(b".", MNT_DETACH), "umount old root")
    os.chdir("/")


def _overlay(source, target, empty):
    """A read-only overlay of the host directory ``source`` at ``target``: a file system of
    its own, so that a sandbox's /proc/self/mountinfo shows ``/`` and ``overlay`` for it,
    never the host path or disk. The layers are named by /proc/self/fd links (the kernel
    shows the names as given), the lower one an empty directory (a read-only overlay needs
    two). False where the kernel refuses (no overlayfs, or a gVisor without it): then the
    caller binds instead."""
    os.makedirs(target, exist_ok=True)
    fds = [os.open(source, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC), os.open(empty, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)]
    try:
        lower = ":".join(f"/proc/self/fd/{fd}" for fd in fds)
        return _libc.mount(b"overlay", target.encode(), b"overlay", MS_RDONLY | MS_NOSUID | MS_NODEV,
                           f"lowerdir={lower}".encode()) == 0
    finally:
        for fd in fds:
            os.close(fd)


def _copy_in(source, target):
    """Copy a file, or a directory tree (the published /etc), into the view's tmpfs."""
    if os.path.isdir(source):
        os.makedirs(target, exist_ok=True)
        for entry in os.scandir(source):
            _copy_in(entry.path, os.path.join(target, entry.name))
        return
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with open(source, "rb") as src, open(target, "wb") as dst:
        dst.write(src.read())
    os.chmod(target, 0o644)


def _enter_view(view):
    """A host zygote's own file system (its *view*), entered before anything is imported:
    the targets of the sandboxes' mount plan, each from a file system of its own (an
    overlay per host directory, copies of the files, in a tmpfs), plus what the zygote
    itself needs of the host (/dev, /proc, the cgroup tree, the egress sockets), in a
    private mount namespace, then pivoted into. The sandboxes it builds bind target to
    target (as inside gVisor), so nothing of the host's layout (the state directory, the
    checkout, the disk) appears in their mountinfo, and the runtime's interpreter runs at
    its sandbox path. Mounts vanish with the zygote's mount namespace; none is made on the
    host."""
    _check(_libc.unshare(CLONE_NEWNS), "unshare mount namespace")
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    root = view["root"]
    _mount("execbox", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=16m,mode=0755")
    empty = root + "/.empty"
    os.mkdir(empty, 0o555)
    for op, source, target in view["steps"]:
        dest = root + target
        if op == "symlink":
            os.symlink(source, dest)
        elif op == "copy":
            _copy_in(source, dest)
        elif op == "overlay":
            if not _overlay(source, dest, empty):
                _ro_bind(source, dest)
        elif op == "rbind":
            _ro_bind(source, dest, writable=True)
        else:
            raise OSError(f"unknown view step {op!r}")
    os.makedirs(root + view["sandbox_root"], exist_ok=True)
    os.makedirs(root + "/tmp", mode=0o1777, exist_ok=True)  # bwrap's own scratch mount point
    _pivot_into(root)


def _exec_in_view(sock, config):
    """Enter the view, then start again inside it: the interpreter at its sandbox path
    (so the runtime's own paths are the sandboxes' paths), the configuration handed on in
    a memfd."""
    view = config.pop("view")
    _enter_view(view)
    fd = os.memfd_create("zygote-config", 0)
    os.write(fd, json.dumps(config).encode())
    os.lseek(fd, 0, os.SEEK_SET)
    sock.set_inheritable(True)
    env = dict(os.environ, EXECBOX_ZYGOTE_FD=str(sock.fileno()), EXECBOX_ZYGOTE_CONFIG_FD=str(fd))
    os.execve(view["exec"][0], view["exec"], env)


def _loopback_up():
    """Bring up ``lo`` in this process's network namespace (a fresh one has it down on
    Linux; gVisor's is up already)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        flags = struct.unpack(_IFREQ, fcntl.ioctl(sock, SIOCGIFFLAGS, struct.pack(_IFREQ, b"lo", 0)))[1]
        if not flags & IFF_UP:
            try:
                fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack(_IFREQ, b"lo", flags | IFF_UP))
            except OSError as exc:  # e.g. a container without NET_ADMIN
                raise OSError(exc.errno, f"bring up the sandbox's loopback interface for egress "
                                         f"(needs CAP_NET_ADMIN): {exc.strerror}") from exc


def _renumber(fds, first):
    """dup ``fds`` to ``first``, ``first + 1``, ... (safe when the numbers overlap)."""
    high = [os.dup(fd) for fd in fds]
    for index, fd in enumerate(high):
        os.dup2(fd, first + index, inheritable=True)
        os.close(fd)
    return list(range(first, first + len(fds)))


def _child(config, request, fds, driver):
    """In the forked child (pid 2 of the sandbox's namespaces): isolate, then become the driver."""
    for path in request["cgroups"]:
        with open(path, "w") as fh:
            fh.write("0")
    if request["cgroups"]:
        _check(_libc.unshare(CLONE_NEWCGROUP), "unshare cgroup namespace")
    if config.get("loopback"):
        _loopback_up()
    uid = request["uid"]
    _build_root(config["root"], config["plan"] + request.get("plan", []), uid)
    _check(_libc.sethostname(b"sandbox", 7), "sethostname")
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(fds[2], 1)
    os.dup2(fds[3], 2)
    control, events = _renumber(fds[:2], 3)
    os.closerange(5, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    for name, value in request["rlimits"].items():
        resource.setrlimit(_RLIMITS[name], (value, value))
    # empty the bounding set too, where this process may (EINVAL: a number beyond this kernel's;
    # EPERM: a container that withholds what the drop needs): the plain uid below holds no
    # capability either way, and no_new_privs keeps it from ever gaining one
    for cap in config["bounding"]:
        if _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) < 0 and (err := ctypes.get_errno()) not in (errno.EINVAL, errno.EPERM):
            raise OSError(err, f"drop capability {cap} from the bounding set: {os.strerror(err)}")
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
    if config.get("exec"):
        os.execve(config["exec"][0], config["exec"], config["env"])
    sys.stdin = open(0, "r", closefd=False)
    sys.stdout = open(1, "w", encoding="utf-8", errors="backslashreplace", closefd=False)
    sys.stderr = open(2, "w", encoding="utf-8", errors="backslashreplace", closefd=False)
    os.environ.clear()
    os.environ.update(config["env"])
    driver.serve(control, events)


def _bounding_set():
    """The capabilities in this process's bounding set (a child's can only be smaller), so
    that a child empties its own with one prctl per capability held, not one per number
    (inside gVisor, where the zygote holds a few, each call is a round trip to the sentry).
    None without CAP_SETPCAP, which dropping one needs: a container given only what execbox
    needs (docker-compose.yml, the Kubernetes base) keeps its bounding set, and its
    sandboxes still hold no capability (a plain uid) nor can gain one (no_new_privs)."""
    try:
        with open("/proc/self/status") as fh:
            masks = {line[:6]: int(line.split()[1], 16) for line in fh if line.startswith(("CapBnd:", "CapEff:"))}
        mask, effective = masks["CapBnd"], masks["CapEff"]
    except (OSError, KeyError, ValueError, IndexError):
        mask = effective = (1 << 64) - 1
    if not effective >> CAP_SETPCAP & 1:
        return []
    return [cap for cap in range(64) if mask >> cap & 1]  # a number beyond this kernel's is skipped


def _clone(flags):
    """fork(2) with namespace flags (raw clone: Python has no API for it)."""
    pid = _libc.syscall(SYSCALLS["clone"], flags | signal.SIGCHLD, 0, 0, 0, 0)
    if pid < 0:
        raise OSError(ctypes.get_errno(), "clone failed")
    return pid


def _init_process():
    """pid 1 of one sandbox: reaps orphans until it is killed (which ends the namespaces)."""
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
    """(pid, raw status, rusage) of every child that has ended, without blocking."""
    while True:
        try:
            pid, status, usage = os.wait3(os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        yield pid, status, usage


def _kill_all(pids):
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _reap_within(pid, timeout_s):
    """SIGKILL ``pid`` (a child of this process) and reap it; whether that happened in time."""
    _kill_all([pid])
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return True
        except ChildProcessError:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.001)


def _init_factory(sock, flags):
    """A small process (forked before the preload) that clones one init per sandbox and,
    asked to, kills one and reaps it: once an init is reaped, its PID namespace is empty."""
    _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "parent-death signal")
    inits = set()
    while True:
        request = sock.recv(64)
        inits.difference_update(pid for pid, _, _ in _reaped())  # the inits of destroyed sandboxes
        if not request:
            _kill_all(inits)
            os._exit(0)
        if request.startswith(b"kill "):
            pid = int(request.split()[1])
            confirmed = pid not in inits or _reap_within(pid, 5.0)
            inits.discard(pid)
            sock.send(json.dumps({"confirmed": confirmed}).encode())
            continue
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


def _fork_driver(config, request, fds, driver, unshare_flags=0):
    """Fork the driver-to-be, which (after unsharing ``unshare_flags``) isolates itself and
    becomes the driver; it never returns into the zygote's loop. Returns its pid."""
    pid = os.fork()
    if pid == 0:
        code = 125
        try:
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            if unshare_flags:
                _check(_libc.unshare(unshare_flags), "unshare namespaces")
            _child(config, request, fds, driver)
            code = 0
        except BaseException as exc:
            for fd in (fds[3], 2):  # the stderr channel; at fd 2 only once it has been renumbered
                try:
                    os.write(fd, f"execbox: sandbox setup failed: {exc}\n".encode())
                    break
                except OSError:
                    continue
        finally:
            os._exit(code)
    return pid


def _spawn(config, request, fds, factory, own_ns, driver):
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
        pid = _fork_driver(config, request, fds, driver)
    finally:
        for fd, _ in targets:
            os.close(fd)
        for ns, fd in own_ns.items():
            _setns(fd, ns)
    return pid, init_pid


def _kill(request, factory):
    """End one sandbox: its init dies, so does every process of its PID namespace."""
    _kill_all([request["pid"]])
    factory.send(f"kill {int(request['init'])}".encode())
    return bool(json.loads(factory.recv(256)).get("confirmed"))


def _pid_setns_works(own_pid_ns):
    """Whether setns(2) works on PID namespaces here (not on gVisor's kernel): entering the
    zygote's own PID namespace, which changes nothing."""
    return _libc.setns(own_pid_ns, CLONE_NEWPID) == 0


def _spawn_guest(config, request, fds, driver, own_mnt):
    """Unshare mode (gVisor has no setns(2) for PID namespaces): a fresh PID namespace for
    this process's next children (unshare), the init spawned into it first (pid 1; a
    vfork-style spawn of a tiny program, so the big zygote is not copied; it gets no fd of
    the zygote's; it starts in the sandbox's proc view, see _proc_view), then the driver
    forked into it (pid 2), which unshares the other namespaces itself."""
    for fd in fds:
        os.set_inheritable(fd, False)  # the driver dup's its own; the init gets none
    _check(_libc.unshare(CLONE_NEWPID), "unshare pid namespace")
    null = [(os.POSIX_SPAWN_OPEN, fd, "/dev/null", os.O_RDWR, 0) for fd in (0, 1, 2)]
    view = _proc_view(own_mnt)
    try:
        try:
            init_pid = os.posix_spawn(INIT_ARGV[0], (*INIT_ARGV, str(SYSCALLS["prctl"])), {}, file_actions=null)
        finally:
            _setns(own_mnt, "mnt")
        pid = _fork_driver(config, request, fds, driver, CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWNET)
    except BaseException:
        os.close(view)
        raise
    _PROC_VIEWS[pid] = view
    return pid, init_pid


def _proc_view(own_mnt):
    """Enter a mount namespace like this process's own (``own_mnt``) with a procfs of its
    own at /proc, and return an fd of it: the sandbox's *proc view*, where its init starts
    and where this process looks up the sandbox's processes (their status, their mount
    namespace, what is left of its uid), until the sandbox is killed and the fd closed.

    Why: gVisor (runsc 20240729) keeps about 125 KiB of sentry memory, for as long as a
    procfs exists, for every process whose /proc/<pid> entry was looked up in it, after
    the process has exited. Looked up in the gVisor sandbox's own /proc (perl reads
    /proc/self/exe at start, and the peak memory, the artifacts and the end-of-sandbox
    check read /proc/<pid>), that grew the sentry by ~0.3 MiB per execution; a procfs per
    sandbox takes its entries with it (measured flat over 400 executions)."""
    _check(_libc.unshare(CLONE_NEWNS), "unshare mount namespace")
    try:
        _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing mounted here reaches the zygote's
        _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        return os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    except BaseException:
        _setns(own_mnt, "mnt")
        raise


@contextlib.contextmanager
def _in_proc_view(pid, own_mnt):
    """The block runs in the proc view of the sandbox whose driver is ``pid``, then this
    process is back in ``own_mnt`` (in setns mode there is none: /proc is its own)."""
    view = _PROC_VIEWS.get(pid)
    if view is None:
        yield
        return
    _setns(view, "mnt")
    try:
        yield
    finally:
        _setns(own_mnt, "mnt")


def _proc_status(pid):
    """/proc/<pid>/status with one read (open() adds an fstat, an ioctl and a seek; inside
    gVisor each is a round trip to the sentry); b"" once the process is gone."""
    try:
        fd = os.open(f"/proc/{pid}/status", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return b""
    try:
        return os.read(fd, 1 << 16)
    except OSError:
        return b""
    finally:
        os.close(fd)


def _status_field(status, name):
    """The first number of the ``name:`` line of a /proc/<pid>/status text, or None."""
    at = status.find(b"\n" + name + b":")
    if at < 0:
        return None
    try:
        return int(status[at + len(name) + 2:].split()[0])
    except (ValueError, IndexError):
        return None


def _uid_left(uid):
    """Whether any process of ``uid`` is still alive (zombies included)."""
    for name in os.listdir("/proc"):
        if name.isdigit() and _status_field(_proc_status(name), b"Uid") == uid:
            return True
    return False


def _kill_guest(config, request, sock, children, inits, own_mnt):
    """End one sandbox in unshare mode: SIGKILL its init and driver, reap both (reporting
    the driver's exit), wait until no process of its uid is left (gVisor kills the rest of
    a PID namespace when its init dies, but does not wait for them) and, inside gVisor,
    drain its control channel (the next sandbox reads the same one). True when all of that
    was confirmed. Only this process's unreaped children are signalled: a reaped pid may
    belong to another process already."""
    driver = int(request["pid"])
    pids = [pid for pid in (driver, int(request["init"])) if pid in children or pid in inits]
    _kill_all(pids)
    deadline = time.monotonic() + 5.0
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                done, status, usage = os.wait4(pid, os.WNOHANG)
            except ChildProcessError:
                break  # reaped (and reported) by the main loop already
            if done == pid:
                children.discard(pid)
                inits.discard(pid)
                if pid == driver:
                    _report(sock, pid, status, usage)
                break
            time.sleep(0.001)
    confirmed = True
    try:
        with _in_proc_view(driver, own_mnt):
            while _uid_left(int(request["uid"])):
                if time.monotonic() >= deadline:
                    confirmed = False
                    break
                time.sleep(0.002)
    finally:
        view = _PROC_VIEWS.pop(driver, None)
        if view is not None:
            os.close(view)
    if not config.get("channel"):
        return confirmed
    control = config["channel"][0]
    os.set_blocking(control, False)  # the file description is shared with the next driver:
    try:  # blocking again before it is spawned
        while os.read(control, 1 << 16):
            pass
    except BlockingIOError:
        pass
    finally:
        os.set_blocking(control, True)
    return confirmed


def _open_dir_nofollow(path):
    """open(path, O_DIRECTORY | O_NOFOLLOW), also where gVisor follows a final symlink despite
    O_NOFOLLOW (it does when O_DIRECTORY is given): the name is opened with O_PATH, refused
    unless a directory, then that very directory opened (as hostproc.open_dir_nofollow)."""
    handle = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if not stat.S_ISDIR(os.fstat(handle).st_mode):
            raise NotADirectoryError(path)
        return os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=handle)
    finally:
        os.close(handle)


def _copy_artifacts(pid, export_dir, own_mnt):
    """Enter the sandbox's mount namespace (``pid``: its driver) and copy the regular files
    directly under its artifacts directory into ``export_dir`` (an fd opened beforehand),
    never following a symlink; the host applies its own rules to what it finds there."""
    for name in os.listdir(export_dir):
        os.unlink(name, dir_fd=export_dir)
    target = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(target, "mnt")
        count = 0
        try:
            source = _open_dir_nofollow(_ARTIFACTS)
        except OSError:
            return 0
        try:
            for name in sorted(os.listdir(source)):
                try:
                    fd = os.open(name, _NOFOLLOW, dir_fd=source)
                except OSError:
                    continue
                try:
                    if not stat.S_ISREG(os.fstat(fd).st_mode):
                        continue
                    out = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600, dir_fd=export_dir)
                    try:
                        while chunk := os.read(fd, 1 << 20):
                            os.write(out, chunk)
                    finally:
                        os.close(out)
                    count += 1
                except OSError:  # the export tmpfs is full: the host keeps what fitted
                    break
                finally:
                    os.close(fd)
        finally:
            os.close(source)
        return count
    finally:
        os.close(target)
        _setns(own_mnt, "mnt")


def _peak_kb(pid):
    """The peak resident memory of a live process in KiB (VmHWM; gVisor has only VmRSS, the
    resident memory now, a lower bound of the peak); 0 once it is gone."""
    status = _proc_status(pid)
    for name in (b"VmHWM", b"VmRSS"):
        if (value := _status_field(status, name)) is not None:
            return value
    return 0


def _report(sock, pid, status, usage):
    cpu_ms = (usage.ru_utime + usage.ru_stime) * 1000.0
    _send(sock, {"op": "exit", "pid": pid, "status": status, "maxrss_kb": usage.ru_maxrss, "cpu_ms": cpu_ms})


def _send(sock, message):
    sock.send(json.dumps(message).encode())


def _load_driver(path):
    """The Python driver, imported once (its module object serves every fork)."""
    if not path:
        return None
    spec = importlib.util.spec_from_file_location("driver", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main():
    _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "parent-death signal")
    sock = socket.socket(fileno=int(os.environ.pop("EXECBOX_ZYGOTE_FD")))
    sock.set_inheritable(False)  # no init or exec'd driver gets it
    children, inits = set(), set()  # drivers; inits (unshare mode)
    config_fd = os.environ.pop("EXECBOX_ZYGOTE_CONFIG_FD", None)
    if config_fd is None:
        config = json.loads(sock.recv(1 << 22))
    else:  # started again inside its view (see _exec_in_view)
        with open(int(config_fd), "rb") as fh:
            config = json.loads(fh.read())
    SYSCALLS.update(config["syscalls"])
    if config.get("view"):
        try:
            _exec_in_view(sock, config)
        except Exception as exc:
            _send(sock, {"op": "error", "id": "", "message": f"the fork server's view: {exc}"})
            raise
    _set_title(config.get("title") or "sandbox-init")
    config["filter"] = base64.b64decode(config["filter"])
    config["bounding"] = _bounding_set()
    if config.get("export"):
        config["export_fd"] = os.open(config["export"], os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    driver = _load_driver(config.get("driver"))
    os.environ.clear()
    os.environ.update(config["env"])
    flags = CLONE_NEWPID | CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWNET
    namespaces = ["pid", "mnt", "ipc", "uts", "net"]
    own_ns = {ns: os.open(f"/proc/self/ns/{ns}", os.O_RDONLY | os.O_CLOEXEC) for ns in namespaces}
    os.nice(config.get("nice", 0))  # clones and their set-up yield to running programs
    guest = bool(config.get("channel"))
    pid_setns = not guest and _pid_setns_works(own_ns["pid"])
    factory = None
    if guest:
        for fd in config["channel"]:
            os.set_inheritable(fd, False)  # only the driver gets them (dup'd), never an init
    elif pid_setns:
        factory, factory_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        if os.fork() == 0:  # before the preload: each init is a clone of a small process
            try:
                sock.close()
                factory.close()
                _init_factory(factory_end, flags)
            finally:
                os._exit(1)
        factory_end.close()
    if driver is not None:
        os.environ["EXECBOX_PRELOAD"] = config.get("preload", "")
        # matplotlib, if preloaded, reads the font cache prepared by `execbox build` (never the host's
        # /tmp); it wants a writable directory, else it rebuilds the cache: a private copy
        cache = os.environ.get("EXECBOX_MPL_CACHE")
        if cache and os.path.isdir(cache):
            private = os.path.join(config["root"], ".mplconfig")
            os.makedirs(private, exist_ok=True)
            for name in os.listdir(cache):
                with open(os.path.join(cache, name), "rb") as src, open(os.path.join(private, name), "wb") as dst:
                    dst.write(src.read())
            os.environ["MPLCONFIGDIR"] = private
        driver.preload()
        gc.collect()
        gc.freeze()  # preloaded objects stay out of the children's collections: fewer copy-on-write faults
        os.environ.clear()
        os.environ.update(config["env"])
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.set_wakeup_fd(wake_w)
    _send(sock, {"op": "ready", "pidns": "setns" if pid_setns else "unshare"})
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
            for pid, status, usage in _reaped():
                inits.discard(pid)
                if pid in children:  # a driver (not an init, nor an orphan of gVisor's)
                    children.discard(pid)
                    _report(sock, pid, status, usage)
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
            request = {}
            try:
                request = json.loads(data)
                op = request["op"]
                if op == "spawn":
                    channel = fds or config.get("channel") or []
                    if len(channel) != 4:
                        raise OSError("spawn needs four channel fds")
                    if pid_setns:
                        pid, init_pid = _spawn(config, request, channel, factory, own_ns, driver)
                    else:
                        pid, init_pid = _spawn_guest(config, request, channel, driver, own_ns["mnt"])
                        inits.add(init_pid)
                    children.add(pid)
                    _send(sock, {"op": "spawned", "id": request["id"], "pid": pid, "init": init_pid})
                elif op == "kill":
                    confirmed = (_kill(request, factory) if pid_setns
                                 else _kill_guest(config, request, sock, children, inits, own_ns["mnt"]))
                    _send(sock, {"op": "killed", "id": request["id"], "confirmed": confirmed})
                elif op == "collect":
                    pid = int(request["pid"])
                    with _in_proc_view(pid, own_ns["mnt"]):
                        hwm_kb = _peak_kb(pid)
                        count = _copy_artifacts(pid, config["export_fd"], own_ns["mnt"])
                    _send(sock, {"op": "collected", "id": request["id"], "count": count, "hwm_kb": hwm_kb})
                else:
                    raise OSError(f"unknown op {op!r}")
            except Exception as exc:
                _send(sock, {"op": "error", "id": str(request.get("id", "")), "message": str(exc)})
            finally:
                for fd in fds:
                    os.close(fd)


if __name__ == "__main__":
    main()
