"""The ``runtimeclass-gvisor`` overlay for real: execbox's namespaces backend inside gVisor.

A Kubernetes node with a gVisor RuntimeClass runs the execbox pod under ``runsc``: the
service, its fork servers and every sandbox run on gVisor's kernel. This module does the
same on one machine. It starts ``python -m execbox.cli serve`` as the first process of a
``runsc`` sandbox ("the pod"):

* root is the host's ``/``, read-only (the checkout, the virtualenv and the built runtime
  environments are all there), with private tmpfs ``/tmp``, ``/run`` and state directory;
  gVisor's own ``/proc``, ``/sys`` and cgroupfs, as a pod gets them;
* root with the capabilities of ``deploy/kubernetes/base/deployment.yaml`` (read from the
  manifest), which are capabilities inside gVisor's kernel only;
* gVisor's own network stack with its loopback only (``--network=none``; this runsc's
  ``--network=sandbox`` refuses current kernels, whose every network namespace has
  ``net.core.rmem_default``), where execbox listens on 127.0.0.1: the test's HTTP calls
  run inside the pod (``runsc exec``), as a kubelet's probes reach a pod.

and checks what the overlay promises through the service's HTTP API: ready with the
namespaces backend (fork server, in its unshare mode), Python and Node.js run, a forbidden
syscall is a SIGSYS verdict, a memory hog is a memory verdict, a sandbox's network is
a loopback of its own (not the pod's, where execbox listens), an execution finds nothing
of the one before it, artifacts and session files never follow a symlink into the pod
(gVisor follows one given O_DIRECTORY | O_NOFOLLOW), ``execbox run`` refuses bwrap there
and runs with the fork server, and nothing is left behind in the pod or on the host.
Skipped only when ``runsc`` is not installed (or the tests do not run as root).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from execbox.settings import Settings

pytestmark = pytest.mark.timeout(900)

REPO = Path(__file__).resolve().parents[2]
RUNSC = shutil.which("runsc") or "/usr/bin/runsc"
PORT = 9385
#: what the pod's settings say, and so what the answers must show
MEMORY_LIMIT_BYTES = 256 << 20
TIMEOUT_S = 20
READY_TIMEOUT_S = 420.0
#: an HTTP client run inside the pod: argv method, path, JSON body; prints status and body
CLIENT = """
import json, sys, urllib.error, urllib.request
method, path, body = sys.argv[1], sys.argv[2], sys.argv[3].encode() or None
request = urllib.request.Request("http://127.0.0.1:%d" % int(sys.argv[4]) + path, data=body, method=method,
                                 headers={"Content-Type": "application/json"})
try:
    with urllib.request.urlopen(request, timeout=float(sys.argv[5])) as response:
        status, text = response.status, response.read().decode()
except urllib.error.HTTPError as exc:
    status, text = exc.code, exc.read().decode()
print(json.dumps({"status": status, "body": text}))
"""
#: prints the (uid, command line) of every process it sees, as JSON
PROCESSES = """
import json, os
found = []
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        with open(f"/proc/{pid}/status") as fh:
            uid = next(int(line.split()[1]) for line in fh if line.startswith("Uid:"))
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            found.append((uid, fh.read().replace(b"\\0", b" ").decode(errors="replace").strip()))
    except (OSError, StopIteration):
        pass
print(json.dumps(found))
"""


def _capabilities() -> list[str]:
    """The capabilities the Deployment adds (all others dropped), as OCI names."""
    deployment = yaml.safe_load((REPO / "deploy/kubernetes/base/deployment.yaml").read_text())
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return [f"CAP_{name}" for name in container["securityContext"]["capabilities"]["add"]]


def _sh(*argv: str, check: bool = True, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()}")
    return done


@dataclass
class Pod:
    """execbox serving inside a runsc sandbox, on the loopback of the sandbox, port PORT."""

    name: str
    runsc_root: Path
    log: Path
    process: subprocess.Popen[bytes] | None = None

    def runsc(self, *args: str, check: bool = True, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
        return _sh(RUNSC, "--root", str(self.runsc_root), *args, check=check, timeout_s=timeout_s)

    def http(self, method: str, path: str, body: Any = None, timeout_s: float = 10) -> tuple[int, Any]:
        """(status, JSON body) of one call to execbox, made inside the pod; (0, why) if none."""
        done = self.runsc(
            "exec", self.name, "/usr/bin/python3", "-I", "-c", CLIENT, method, path,
            "" if body is None else json.dumps(body), str(PORT), str(timeout_s), check=False, timeout_s=timeout_s + 60,
        )  # fmt: skip
        if done.returncode != 0:
            return 0, (done.stderr or done.stdout).strip()[-1500:]
        answer = json.loads(done.stdout)
        try:
            return int(answer["status"]), json.loads(answer["body"])
        except ValueError:
            return int(answer["status"]), answer["body"]

    def said(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""

    def processes(self) -> list[tuple[int, str]]:
        """(uid, command line) of every process in the pod (whose PID namespace is gVisor's)."""
        done = self.runsc("exec", self.name, "/usr/bin/python3", "-I", "-c", PROCESSES)
        return [(int(uid), cmdline) for uid, cmdline in json.loads(done.stdout)]


def _bundle(directory: Path, settings: Settings) -> None:
    """The OCI bundle of the pod (see the module docstring)."""
    state = settings.state_dir
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/root", "PYTHONDONTWRITEBYTECODE": "1",
        "SANDBOX_BACKEND": "namespaces", "SANDBOX_BIND_HOST": "127.0.0.1", "SANDBOX_EXECUTOR_MANAGER_PORT": str(PORT),
        "SANDBOX_EXECUTOR_MANAGER_POOL_SIZE": "1", "SANDBOX_STATE_DIR": str(state), "SANDBOX_CODE_CHECK": "off",
        "SANDBOX_MAX_MEMORY": str(MEMORY_LIMIT_BYTES), "SANDBOX_TIMEOUT": f"{TIMEOUT_S}s",
        "SANDBOX_POOL_WAIT": "120s",
    }  # fmt: skip
    caps = _capabilities()
    tmpfs = {"type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=0755"]}
    config = {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": [sys.executable, "-m", "execbox.cli", "serve"],
            "env": [f"{k}={v}" for k, v in env.items()],
            "cwd": str(REPO),
            "capabilities": {k: caps for k in ("bounding", "effective", "permitted")},
            "rlimits": [{"type": "RLIMIT_NOFILE", "soft": 65536, "hard": 65536}],
        },
        # the host's root, read-only: every mount point below exists on the host already
        "root": {"path": "/", "readonly": True},
        "hostname": "execbox-pod",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs"},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["ro", "nosuid", "nodev", "noexec"]},
            {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup"},
            {"destination": "/tmp", **tmpfs},
            {"destination": "/run", **tmpfs},
            {"destination": str(state), **tmpfs},
            {"destination": str(settings.runtime_dir), "type": "bind", "source": str(settings.runtime_dir),
             "options": ["rbind", "ro"]},
        ],  # fmt: skip
        "linux": {"namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount")]},
    }
    (directory / "config.json").write_text(json.dumps(config, indent=1))


@pytest.fixture(scope="module")
def pod(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pod]:
    if not os.access(RUNSC, os.X_OK):
        pytest.skip("runsc (gVisor) is not installed: `make system-packages` installs it")
    if os.geteuid() != 0:
        pytest.skip("runsc sandboxes and network namespaces need root")
    settings = Settings.load(env_file=None)
    for runtime in ("python", "nodejs"):
        assert (settings.runtime_dir / runtime).is_dir(), f"no {runtime} environment: run `execbox build`"
    work = tmp_path_factory.mktemp("nested-gvisor")
    (work / "bundle").mkdir()
    _bundle(work / "bundle", settings)
    pod = Pod(f"execbox-nested-{os.getpid()}", work / "runsc", work / "pod.log")
    with pod.log.open("wb") as log:
        pod.process = process = subprocess.Popen(
            [RUNSC, "--root", str(pod.runsc_root), "--network=none", "run", "--bundle", str(work / "bundle"), pod.name],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        started = time.monotonic()
        last: Any = ""
        while time.monotonic() - started < READY_TIMEOUT_S:
            if process.poll() is not None:
                raise AssertionError(f"the pod exited ({process.returncode}) during start-up:\n{pod.said()}")
            status, last = pod.http("GET", "/healthz")
            if status == 200:
                break
            time.sleep(3)
        else:
            raise AssertionError(f"not ready within {READY_TIMEOUT_S:.0f} s (/healthz: {last}):\n{pod.said()}")
        print(f"\nnested-gvisor: execbox ready inside runsc {time.monotonic() - started:.0f} s after start")
        yield pod
    finally:
        _stop(pod, process)


def _stop(pod: Pod, process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to execbox (it destroys its sandboxes and exits), then the sandbox goes."""
    if process.poll() is None:
        pod.runsc("kill", pod.name, "TERM", check=False)
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        pod.runsc("kill", "--all", pod.name, "KILL", check=False)
        process.wait(30)
    pod.runsc("delete", "--force", pod.name, check=False)


def run(pod: Pod, code: str, language: str = "python") -> dict[str, Any]:
    body = {"code_b64": base64.b64encode(code.encode()).decode(), "language": language}
    status, answer = pod.http("POST", "/run", body, timeout_s=TIMEOUT_S + 60)
    assert status == 200, answer
    return dict(answer)


def test_ready_with_the_namespaces_backend_in_unshare_mode(pod: Pod) -> None:
    status, health = pod.http("GET", "/healthz")
    assert status == 200, health
    assert health["status"] == "ok", health
    assert health["backend"] == "namespaces", health
    # gVisor has no setns for PID namespaces: the zygote found that out and unshares
    assert health["isolation"] == {
        "launcher": "fork server",
        "pid_namespaces": "unshare",
        "memory_limit": "watched every 10 ms (the cgroups do not enforce it)",
    }, health
    assert health["warnings"] == [], health
    assert "4.4.0" in pod.runsc("exec", pod.name, "/usr/bin/uname", "-r").stdout  # gVisor's kernel, indeed


def test_python_and_nodejs_run(pod: Pod) -> None:
    body = run(pod, "import numpy\ndef main():\n    print('hi')\n    return int(numpy.arange(5).sum())\n")
    assert body["status"] == "success", body
    assert (body["stdout"], body["result"]["value"]) == ("hi\n", 10), body
    js = run(pod, "function main() {\n  console.log('sum');\n  return 40 + 2;\n}\n", "nodejs")
    assert js["status"] == "success", js
    assert (js["stdout"], js["result"]["value"]) == ("sum\n", 42), js


def test_a_forbidden_syscall_is_killed_with_sigsys(pod: Pod) -> None:
    body = run(pod, (
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "def main():\n    print('calling', flush=True)\n    return libc.mount(b'none', b'/tmp', b'tmpfs', 0, None)\n"
    ))  # fmt: skip
    assert body["status"] == "unauthorized_access", body
    assert body["unauthorized_access_type"] == "disallowed_syscall", body
    assert body["exit_code"] == -31, body
    assert body["stdout"] == "calling\n", body


def test_a_memory_hog_gets_the_memory_verdict(pod: Pod) -> None:
    # gVisor's cgroups count memory but do not limit it: execbox watches (isolation/memwatch.py)
    body = run(pod, "def main():\n    hog = []\n    while True:\n        hog.append(bytearray(b'\\xff' * (16 << 20)))\n")
    assert body["status"] == "resource_limit_exceeded", body
    assert body["resource_limit_type"] == "memory", body
    assert body["exit_code"] == -137, body
    # killed once above its limit, within what it allocates between two looks
    assert MEMORY_LIMIT_BYTES < body["memory_used_kb"] * 1024 <= MEMORY_LIMIT_BYTES + (128 << 20), body
    # the next one runs: the pod survived it
    assert run(pod, "def main():\n    return 1\n")["status"] == "success"


def test_the_network_is_a_loopback_of_the_sandbox_own(pod: Pod) -> None:
    body = run(pod, f"""
import os, socket
def main():
    with open('/proc/net/dev') as fh:
        interfaces = sorted(line.split(':')[0].strip() for line in fh.readlines()[2:])
    try:
        with socket.create_connection(('127.0.0.1', {PORT}), timeout=3):
            reached = 'connected'
    except OSError as exc:
        reached = type(exc).__name__ + ': ' + str(exc)
    return {{'interfaces': interfaces, 'reached': reached, 'netns': os.readlink('/proc/self/ns/net')}}
""")
    assert body["status"] == "success", body
    seen = body["result"]["value"]
    assert seen["interfaces"] == ["lo"], body
    # execbox listens on the pod's loopback; the sandbox has a network namespace of its own
    # (and no socket family but AF_UNIX: the seccomp filter refuses the rest)
    assert seen["reached"].startswith("OSError: [Errno 97]"), f"EAFNOSUPPORT expected: {body}"
    pods = pod.runsc("exec", pod.name, "/usr/bin/readlink", "/proc/1/ns/net").stdout.strip()
    assert pods.startswith("net:[") and seen["netns"].startswith("net:[") and seen["netns"] != pods, (pods, body)


def test_the_next_execution_sees_nothing_of_the_previous(pod: Pod) -> None:
    first = run(pod, """
import os, subprocess
def main():
    for path in ('/tmp/left-behind', '/workspace/left-behind', '/dev/shm/left-behind'):
        with open(path, 'w') as fh:
            fh.write('secret')
    child = subprocess.Popen(['/usr/bin/sleep', '313'], start_new_session=True)
    return {'uid': os.getuid(), 'pid': child.pid}
""")
    assert first["status"] == "success", first
    assert first["result"]["value"]["uid"] != 0
    second = run(pod, """
import os
def main():
    found = [p for p in ('/tmp/left-behind', '/workspace/left-behind', '/dev/shm/left-behind') if os.path.exists(p)]
    commands = []
    for pid in os.listdir('/proc'):
        if pid.isdigit():
            try:
                with open(f'/proc/{pid}/cmdline', 'rb') as fh:
                    commands.append(fh.read().replace(b'\\0', b' ').decode().strip())
            except OSError:
                pass
    return {'files': found, 'commands': commands, 'uid': os.getuid(), 'pid': os.getpid()}
""")
    assert second["status"] == "success", second
    seen = second["result"]["value"]
    assert seen["files"] == [], second
    assert not any("sleep" in c for c in seen["commands"]), second
    assert seen["pid"] == 2, second  # pid 1 is the sandbox's init: a PID namespace of its own
    # and in the pod: the first sandbox's process is gone with its sandbox
    deadline = time.monotonic() + 30
    while [c for _, c in pod.processes() if "sleep 313" in c] and time.monotonic() < deadline:
        time.sleep(1)
    left = pod.processes()
    assert not [c for _, c in left if "sleep 313" in c], left


@pytest.fixture
def pod_secret(pod: Pod) -> Iterator[str]:
    """A directory of the pod (not of any sandbox) holding a file of an allowed artifact type."""
    token = f"pod-secret-{os.getpid()}-{time.monotonic_ns()}"
    pod.runsc("exec", pod.name, "/bin/sh", "-c", f"mkdir -p /tmp/{token} && echo {token} > /tmp/{token}/secret.csv")
    try:
        yield f"/tmp/{token}"
    finally:
        pod.runsc("exec", pod.name, "/bin/rm", "-rf", f"/tmp/{token}", check=False)


def test_artifacts_never_follow_a_symlink_into_the_pod(pod: Pod, pod_secret: str) -> None:
    # gVisor follows a symlink given O_DIRECTORY | O_NOFOLLOW: execbox must not rely on it
    body = run(pod, f"""
import os, shutil
def main():
    shutil.rmtree('artifacts')
    os.symlink({pod_secret!r}, 'artifacts')
    return os.readlink('artifacts')
""")
    assert body["status"] == "success", body
    assert body["result"]["value"] == pod_secret
    assert body["artifacts"] == [], body


def test_session_files_never_follow_a_symlink_into_the_pod(pod: Pod, pod_secret: str) -> None:
    status, session = pod.http("POST", "/v1/sessions", {"language": "python"})
    assert status == 201, session
    base = f"/v1/sessions/{session['id']}"
    try:
        status, cell = pod.http("POST", f"{base}/execute", {"code": f"import os\nos.symlink({pod_secret!r}, 'linked')\n"})
        assert status == 200 and cell["status"] == "success", cell
        status, answer = pod.http("GET", f"{base}/files/linked/secret.csv")
        assert status == 400, (status, answer)
        status, answer = pod.http("PUT", f"{base}/files/linked/planted.csv", "planted")
        assert status == 400, (status, answer)
        status, listing = pod.http("GET", f"{base}/files")
        assert status == 200 and listing["files"] == [], listing
        left = pod.runsc("exec", pod.name, "/bin/ls", pod_secret).stdout.split()
        assert left == ["secret.csv"], left
    finally:
        pod.http("DELETE", base)


def test_execbox_run_refuses_bwrap_and_runs_with_the_fork_server(pod: Pod) -> None:
    pod.runsc("exec", pod.name, "/bin/sh", "-c", "printf 'def main():\\n    return 6 * 7\\n' > /tmp/answer.py")

    def execbox_run(*settings: str) -> subprocess.CompletedProcess[str]:
        return pod.runsc(
            "exec", "--cwd", str(REPO), pod.name, "/usr/bin/env", "SANDBOX_BACKEND=namespaces", *settings,
            sys.executable, "-m", "execbox.cli", "run", "/tmp/answer.py", check=False, timeout_s=300,
        )  # fmt: skip

    # `execbox run` picks bwrap for one execution, which gVisor's kernel cannot run: said so
    refused = execbox_run()
    assert refused.returncode == 1, refused
    assert "bwrap cannot build a sandbox on this kernel (the kernel is gVisor's" in refused.stderr, refused.stderr
    assert "set SANDBOX_FORKSERVER=true" in refused.stderr, refused.stderr
    done = execbox_run("SANDBOX_FORKSERVER=true")
    assert done.returncode == 0, done
    answer = json.loads(done.stdout)
    assert (answer["status"], answer["result"]["value"]) == ("success", 42), answer


def _sandbox_inits_and_cgroups(pod: Pod) -> tuple[int, list[str]]:
    """(sandbox inits running in the pod, sandbox cgroups there): one each per live sandbox."""
    inits = sum(1 for uid, cmdline in pod.processes() if (uid, cmdline) == (65534, "sandbox-init"))
    listing = pod.runsc("exec", pod.name, "/bin/ls", "/sys/fs/cgroup/pids/execbox", check=False).stdout.split()
    return inits, [name for name in listing if name.startswith("ns-")]


def test_zz_nothing_is_left_behind(pod: Pod) -> None:
    """Last: in the pod, one init per live sandbox (none of an ended one lingers); then SIGTERM
    stops execbox cleanly, and nothing of the pod is left on the host."""
    deadline = time.monotonic() + 30
    while (seen := _sandbox_inits_and_cgroups(pod))[0] != len(seen[1]) and time.monotonic() < deadline:
        time.sleep(1)
    assert seen[0] == len(seen[1]) and seen[1], f"sandbox inits {seen[0]} for live sandboxes {seen[1]}"
    assert pod.process is not None
    pod.runsc("kill", pod.name, "TERM")
    # uvicorn raises SIGTERM again once it has shut down cleanly: 143 (128 + 15)
    assert pod.process.wait(60) in (0, 143), pod.said()
    assert "Application shutdown complete" in pod.said(), pod.said()
    pod.runsc("delete", "--force", pod.name, check=False)
    left = [p for p in Path("/proc").iterdir() if p.name.isdigit() and pod.name.encode() in _cmdline(p)]
    assert not left, f"processes of the pod left on the host: {left}"
    assert not list(Path("/sys/fs/cgroup").glob(f"*/{pod.name}")), "the pod's host cgroups are left"


def _cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:
        return b""
