"""gVisor's two walls: successive executions in ONE long-lived gVisor sandbox see nothing of
each other, and a sandbox is replaced after its count or after an execution misbehaved.

These tests drive the backend directly (create -> run -> destroy, one sandbox at a time),
so that the next execution provably lands in the same gVisor sandbox as the previous one
(asserted through ``container_id``); through a pool, a refill may start another one.
They run on the gVisor backend in two-walls mode and are skipped, with the reason, where
runsc is missing or cannot hold two walls.
"""

from __future__ import annotations

import glob
import os
import textwrap
from collections.abc import Iterator
from typing import Any

import pytest

from execbox.isolation.base import IsolationBackend, Sandbox
from execbox.models import ExecutionRequest, Language
from execbox.runtimes import get_runtime
from execbox.service.backends import build_backend
from execbox.service.specs import sandbox_spec
from execbox.settings import Settings
from execbox.isolation.seccomp import syscall_number

PLANT = """
import ctypes, os, socket, subprocess, sys, time

def main():
    os.makedirs('artifacts', exist_ok=True)
    for path in ('/tmp/planted', '/dev/shm/planted', 'planted', 'artifacts/planted.csv'):
        with open(path, 'w') as fh:
            fh.write('secret')
    libc = ctypes.CDLL(None, use_errno=True)
    shm = libc.shmget(0x5EC2E7, 4096, 0o1666)  # IPC_CREAT | 0666
    msq = libc.msgget(0x5EC2E7, 0o1666)
    keep = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    keep.bind('\\0execbox-planted')
    keep.listen(1)
    os.chdir('/tmp')
    os.environ['PLANTED'] = '1'
    if os.fork() == 0:  # a daemon that ignores SIGTERM/SIGHUP and keeps writing
        os.setsid()
        if os.fork() == 0:
            import signal
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            while True:
                try:
                    with open('/tmp/daemon', 'a') as fh:
                        fh.write('x')
                    print('daemon output', flush=True)
                except OSError:
                    pass
                time.sleep(0.01)
        os._exit(0)
    time.sleep(0.2)
    return {'shm': shm, 'msq': msq, 'uid': os.getuid()}
"""

PROBE = """
import ctypes, os, socket

def main():
    libc = ctypes.CDLL(None, use_errno=True)
    seen = {}
    seen['files'] = [p for p in ('/tmp/planted', '/tmp/daemon', '/dev/shm/planted', 'planted',
                                 'artifacts/planted.csv') if os.path.exists(p)]
    seen['shm'] = libc.shmget(0x5EC2E7, 4096, 0o666)
    seen['msq'] = libc.msgget(0x5EC2E7, 0o666)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect('\\0execbox-planted')
        seen['socket'] = 'connected'
    except OSError as exc:
        seen['socket'] = type(exc).__name__
    seen['cwd'] = os.getcwd()
    seen['env'] = 'PLANTED' in os.environ
    seen['processes'] = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())
    seen['uid'] = os.getuid()
    return seen
"""


def _two_walls_backend(settings: Settings) -> IsolationBackend:
    """A checked gVisor backend in two-walls mode; the test is skipped, with the reason, where
    there is none."""
    if os.geteuid() != 0:
        pytest.skip("sandbox suites need root (cgroups, runsc): run pytest as root")
    from execbox.errors import BackendUnavailableError

    backend = build_backend("gvisor", settings)
    try:
        backend.check()
    except BackendUnavailableError as exc:
        pytest.skip(f"gvisor backend unavailable: {exc}")
    if getattr(backend, "mode", "") != "two-walls":
        pytest.skip(f"this runsc cannot hold two walls: {backend.describe().get('mode_reason')}")
    return backend


@pytest.fixture(scope="module")
def two_walls(sandbox_settings: Settings) -> Iterator[IsolationBackend]:
    """A gVisor backend in two-walls mode whose sandboxes serve 3 executions each."""
    backend = _two_walls_backend(sandbox_settings.model_copy(update={"gvisor_executions_per_sandbox": 3}))
    yield backend
    backend.close()


def _run(backend: IsolationBackend, settings: Settings, code: str, **limits: Any) -> tuple[str, Any, Sandbox]:
    """One execution in a freshly created sandbox: (container id, outcome, sandbox)."""
    spec = _spec(backend, settings)
    sandbox = backend.create(spec)
    try:
        request = ExecutionRequest(language=Language.PYTHON, code=textwrap.dedent(code))
        outcome = sandbox.run(request, settings.default_limits().model_copy(update=limits))
    finally:
        sandbox.destroy()
    return sandbox.container_id, outcome, sandbox  # type: ignore[attr-defined]


_SPECS: dict[int, Any] = {}


def _spec(backend: IsolationBackend, settings: Settings) -> Any:
    """One spec object per backend (hosts are kept per spec, as a pool does)."""
    return _SPECS.setdefault(id(backend), sandbox_spec(settings, get_runtime("python")))


def _value(outcome: Any) -> Any:
    assert outcome.report is not None, (outcome.stdout[-500:], outcome.stderr[-1500:])
    assert outcome.report.exit_code == 0, outcome.stderr[-1500:]
    return outcome.report.result["value"]


def test_the_next_execution_in_the_same_gvisor_sandbox_sees_nothing(
    two_walls: IsolationBackend, sandbox_settings: Settings
) -> None:
    first, planted, _ = _run(two_walls, sandbox_settings, PLANT)
    planted = _value(planted)
    assert planted["shm"] >= 0 and planted["msq"] >= 0, planted  # they were really created
    second, probed, _ = _run(two_walls, sandbox_settings, PROBE)
    assert second == first, "the probe did not run in the same gVisor sandbox: nothing was tested"
    seen = _value(probed)
    assert seen["files"] == [], seen
    assert seen["shm"] == -1 and seen["msq"] == -1, f"SysV IPC objects survived: {seen}"
    assert seen["socket"] != "connected", seen
    assert seen["cwd"] == "/workspace" and seen["env"] is False, seen
    assert seen["processes"] == [1, 2], f"processes of the previous execution are visible: {seen}"
    assert seen["uid"] != planted["uid"], "two executions of one gVisor sandbox shared a uid"
    assert "daemon output" not in probed.stdout.decode(), "the previous execution's daemon wrote into this one"


def test_a_gvisor_sandbox_is_replaced_after_its_count(two_walls: IsolationBackend, sandbox_settings: Settings) -> None:
    ids = [_run(two_walls, sandbox_settings, "def main():\n    return 1\n")[0] for _ in range(7)]
    # 3 executions per gVisor sandbox; the first run may find a sandbox the previous test used
    changes = [i for i in range(1, len(ids)) if ids[i] != ids[i - 1]]
    assert changes, f"one gVisor sandbox served more than its count: {ids}"
    for a, b in zip(changes, changes[1:], strict=False):
        assert b - a == 3, f"a gVisor sandbox did not serve exactly 3 executions: {ids}"
    retired = ids[0] if ids[0] != ids[-1] else None
    assert retired is not None
    assert not glob.glob(f"/sys/fs/cgroup/*/execbox*/{retired}"), "a retired gVisor sandbox left its cgroup"


@pytest.mark.parametrize(
    "how, code, limits",
    [
        ("signal", "import os, signal\ndef main():\n    os.kill(os.getpid(), signal.SIGSEGV)\n", {}),
        ("timeout", "import time\ndef main():\n    time.sleep(30)\n", {"wall_time_s": 1.0}),
        ("oom", "def main():\n    keep = []\n    while True:\n        keep.append(bytearray(8 << 20))\n",
         {"memory_bytes": 64 << 20}),
        (
            "disallowed syscall",
            f"import ctypes\ndef main():\n    ctypes.CDLL(None).syscall({syscall_number('ptrace')}, 0, 0, 0, 0)\n",
            {},
        ),
    ],
)
def test_a_misbehaving_execution_gets_a_new_gvisor_sandbox(
    two_walls: IsolationBackend, sandbox_settings: Settings, how: str, code: str, limits: dict[str, Any]
) -> None:
    before, ok, _ = _run(two_walls, sandbox_settings, "def main():\n    return 1\n")
    assert _value(ok) == 1
    during, bad, _ = _run(two_walls, sandbox_settings, code, **limits)
    assert bad.report is None, f"{how}: the program was expected to misbehave"
    after, fine, _ = _run(two_walls, sandbox_settings, "def main():\n    return 2\n")
    assert _value(fine) == 2
    assert after != during, f"{how}: the next execution ran in the gVisor sandbox that misbehaved"
    if before == during:
        assert not glob.glob(f"/sys/fs/cgroup/*/execbox*/{during}"), f"{how}: the replaced sandbox left its cgroup"


def _anonymous_kb(pids: list[int]) -> int:
    """The resident anonymous memory of these processes (the sentry, its gofer and stubs), KiB."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as fh:
                total += next((int(line.split()[1]) for line in fh if line.startswith("RssAnon:")), 0)
        except OSError:
            continue  # a process that just ended
    return total


def test_a_long_lived_gvisor_sandbox_does_not_grow_with_its_executions(sandbox_settings: Settings) -> None:
    """gVisor keeps ~125 KiB of the sentry's memory for every exited process ever looked up in
    a procfs that lives on; the fork server looks a sandbox's processes (init, driver) up in
    that sandbox's own proc view, which ends with it. Before that, 60 executions in one gVisor
    sandbox grew its processes' anonymous memory by ~20 MiB (~0.3 MiB each)."""
    settings = sandbox_settings.model_copy(update={"gvisor_executions_per_sandbox": 1000})
    backend = _two_walls_backend(settings)
    try:
        hosts, sizes = set(), []
        for index in range(70):
            host_id, outcome, sandbox = _run(backend, settings, "def main():\n    return 1\n")
            assert _value(outcome) == 1
            hosts.add(host_id)
            if index in (9, 69):  # after a warm-up, and at the end
                sizes.append(_anonymous_kb(sandbox.host.cgroup.pids()))  # type: ignore[attr-defined]
        assert len(hosts) == 1, f"the executions did not share one gVisor sandbox: {hosts}"
        grown_mib = (sizes[1] - sizes[0]) / 1024
        assert grown_mib < 6, f"the gVisor sandbox grew by {grown_mib:.1f} MiB over 60 executions: {sizes} KiB"
    finally:
        backend.close()
