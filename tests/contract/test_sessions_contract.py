"""Sessions on every backend: cells share one interpreter, files round-trip, limits end
what they must and nothing more, and a closed session leaves nothing behind.

Real sandboxes as root (the ``executor`` fixture: every backend variant of tests/conftest.py;
on gVisor a session has a gVisor sandbox of its own, so both gVisor variants run sessions
the same way). A :class:`SessionManager` per module runs over that module's executor.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from execbox.errors import BadRequestError, LimitExceededError, NotFoundError
from execbox.models import CellRequest, ExecutionResult, Language, Limits, ResourceLimitType, SessionRequest, Status
from execbox.service.sessions import SessionManager


class Sessions:
    """Synchronous face of a SessionManager on the suite's event loop."""

    def __init__(self, runner: Any, manager: SessionManager) -> None:
        self.runner = runner
        self.manager = manager

    def call(self, coro: Any, timeout_s: float = 120) -> Any:
        return self.runner.loop.run(coro, timeout_s=timeout_s)

    def create(self, language: str = "python", **fields: Any) -> str:
        return self.call(self.manager.create(SessionRequest(language=Language(language), **fields))).id

    def cell(self, session_id: str, code: str, **fields: Any) -> ExecutionResult:
        return self.call(self.manager.execute(session_id, CellRequest(code=code, **fields)))

    def ok(self, session_id: str, code: str, **fields: Any) -> Any:
        """The value of a cell that must succeed."""
        result = self.cell(session_id, code, **fields)
        assert result.status is Status.SUCCESS, self.runner.describe(result)
        return result.result.value if result.result is not None and result.result.present else None

    def delete(self, session_id: str) -> None:
        self.call(self.manager.delete(session_id))

    def sandbox(self, session_id: str) -> Any:
        return self.manager._sessions[session_id].sandbox


@pytest.fixture(scope="module")
def sessions(executor: Any) -> Iterator[Sessions]:
    settings = executor.settings.model_copy(update={"max_sessions": 6})
    manager = SessionManager(settings, executor.executor)
    executor.loop.run(manager.start(), timeout_s=10)
    try:
        yield Sessions(executor, manager)
    finally:
        executor.loop.run(manager.close(), timeout_s=120)


@pytest.fixture
def py(sessions: Sessions) -> Iterator[str]:
    session_id = sessions.create("python")
    yield session_id
    _close(sessions, session_id)


@pytest.fixture
def js(sessions: Sessions) -> Iterator[str]:
    session_id = sessions.create("nodejs")
    yield session_id
    _close(sessions, session_id)


def _close(sessions: Sessions, session_id: str) -> None:
    if session_id in sessions.manager._sessions:
        sessions.delete(session_id)


def _gone(sessions: Sessions, session_id: str) -> None:
    with pytest.raises(NotFoundError):
        sessions.cell(session_id, "1")
    with pytest.raises(NotFoundError):
        sessions.manager.describe(session_id)


# -- state across cells ---------------------------------------------------------------


def test_python_names_imports_and_await_persist(sessions: Sessions, py: str) -> None:
    assert sessions.ok(py, "import math\nx = 41\ndef grow(n):\n    return n + 1") is None
    assert sessions.ok(py, "grow(x)") == 42
    assert sessions.ok(py, "import asyncio\nasync def later(v):\n    await asyncio.sleep(0.01)\n    return v\ny = await later(x * 2)") is None
    assert sessions.ok(py, "y, math.floor(2.5)") == [82, 2]
    text = sessions.cell(py, "class Box: pass\nBox()")
    assert text.result is not None and text.result.type == "text" and "Box object" in text.result.value
    assert sessions.manager.describe(py).executions == 5


def test_python_stdout_stderr_and_failures_are_per_cell(sessions: Sessions, py: str) -> None:
    first = sessions.cell(py, "print('one')\nv = 1")
    assert first.status is Status.SUCCESS and first.stdout == "one\n"
    failed = sessions.cell(py, "print('two')\nraise ValueError('bad cell')")
    assert failed.status is Status.PROGRAM_ERROR and failed.stdout == "two\n"
    assert "ValueError: bad cell" in failed.stderr and "driver" not in failed.stderr
    assert sessions.ok(py, "v + 1") == 2  # a failed cell leaves the session as it was


def test_nodejs_declarations_and_await_persist(sessions: Sessions, js: str) -> None:
    assert sessions.ok(js, "let x = 41; const k = 'key'; var v = 1\nfunction grow(n) { return n + 1 }") is None
    assert sessions.ok(js, "grow(x)") == 42
    assert sessions.ok(js, "const y = await Promise.resolve(x * 2)\nclass Box {}\nasync function f() { return k }") is None
    assert sessions.ok(js, "[y, await f(), v, typeof Box]") == [82, "key", 1, "function"]
    text = sessions.cell(js, "new Map([[1, 2]])")
    assert text.result is not None and text.result.type == "text" and "Map" in text.result.value
    assert sessions.ok(js, "const path = require('path'); path.basename('/a/b.txt')") == "b.txt"
    failed = sessions.cell(js, "console.log('before'); null.boom")
    assert failed.status is Status.PROGRAM_ERROR and failed.stdout == "before\n" and "TypeError" in failed.stderr
    assert sessions.ok(js, "x") == 41


def test_session_environment_is_set(sessions: Sessions) -> None:
    session_id = sessions.create("python", env={"EXECBOX_TEST_VAR": "hello"})
    try:
        assert sessions.ok(session_id, "import os\nos.environ['EXECBOX_TEST_VAR']") == "hello"
    finally:
        sessions.delete(session_id)


# -- artifacts and files --------------------------------------------------------------


def test_artifacts_come_back_with_the_cell_that_wrote_them(sessions: Sessions, py: str) -> None:
    first = sessions.cell(py, "open('artifacts/a.csv', 'w').write('x\\n1\\n')")
    assert [a.name for a in first.artifacts] == ["a.csv"]
    second = sessions.cell(py, "open('artifacts/b.json', 'w').write('{}')")
    assert [a.name for a in second.artifacts] == ["b.json"]
    third = sessions.cell(py, "open('artifacts/a.csv', 'a').write('2\\n')")
    assert [(a.name, a.content) for a in third.artifacts] == [("a.csv", b"x\n1\n2\n")]
    assert sessions.cell(py, "1").artifacts == ()


def test_files_round_trip_byte_exact(sessions: Sessions, py: str) -> None:
    data = os.urandom(1 << 20) + b"\x00\xff"
    info = sessions.call(sessions.manager.put_file(py, "data/in.bin", data))
    assert (info.path, info.size) == ("data/in.bin", len(data))
    digest = sessions.ok(py, "import hashlib\nhashlib.sha256(open('data/in.bin', 'rb').read()).hexdigest()")
    assert digest == hashlib.sha256(data).hexdigest()
    sessions.ok(py, "open('data/out.bin', 'wb').write(bytes(range(256)) * 3)")
    assert sessions.call(sessions.manager.get_file(py, "data/out.bin")) == bytes(range(256)) * 3
    sessions.ok(py, "import os\nos.remove('data/in.bin')")
    listed = {f.path: f.size for f in sessions.call(sessions.manager.list_files(py))}
    assert listed == {"data/out.bin": 768}
    # an uploaded file belongs to the sandbox: the program can change it
    sessions.call(sessions.manager.put_file(py, "mine.txt", b"v1"))
    assert sessions.ok(py, "open('mine.txt', 'a').write('+'); open('mine.txt').read()") == "v1+"
    assert sessions.call(sessions.manager.get_file(py, "mine.txt")) == b"v1+"


@pytest.mark.parametrize("path", ["../outside", "/etc/passwd", "a/../../b", "", "a//b", "./a", "a\0b"])
def test_paths_outside_the_workspace_are_refused(sessions: Sessions, py: str, path: str) -> None:
    with pytest.raises(BadRequestError):
        sessions.call(sessions.manager.put_file(py, path, b"x"))
    with pytest.raises(BadRequestError):
        sessions.call(sessions.manager.get_file(py, path))


def test_symlinks_are_never_followed(sessions: Sessions, py: str, tmp_path: Path) -> None:
    sessions.ok(py, "import os\nos.symlink('/etc/passwd', 'passwd')\nos.symlink('/etc', 'etcdir')\nos.mkdir('real')")
    with pytest.raises(BadRequestError):
        sessions.call(sessions.manager.get_file(py, "passwd"))
    with pytest.raises(BadRequestError):
        sessions.call(sessions.manager.get_file(py, "etcdir/hostname"))
    with pytest.raises(BadRequestError):
        sessions.call(sessions.manager.put_file(py, "etcdir/planted", b"x"))
    with pytest.raises(BadRequestError):
        sessions.call(sessions.manager.put_file(py, "passwd", b"x"))
    assert not Path("/etc/planted").exists()
    assert sessions.ok(py, "os.readlink('passwd')") == "/etc/passwd"  # the link itself is untouched
    with pytest.raises(NotFoundError):
        sessions.call(sessions.manager.get_file(py, "real/missing"))
    assert "passwd" not in {f.path for f in sessions.call(sessions.manager.list_files(py))}


# -- limits ---------------------------------------------------------------------------


def test_time_limit_interrupts_the_cell_and_the_session_lives(sessions: Sessions, py: str, js: str) -> None:
    sessions.ok(py, "kept = 'yes'")
    slow = sessions.cell(py, "import time\nwhile True:\n    time.sleep(0.05)", timeout_s=1.0)
    assert slow.status is Status.RESOURCE_LIMIT_EXCEEDED and slow.exit_code == -124, sessions.runner.describe(slow)
    assert slow.resource_limit_type is ResourceLimitType.TIME
    assert sessions.ok(py, "kept") == "yes"
    sessions.ok(js, "let kept = 'yes'")
    spin = sessions.cell(js, "while (true) {}", timeout_s=1.0)
    assert spin.status is Status.RESOURCE_LIMIT_EXCEEDED and spin.exit_code == -124, sessions.runner.describe(spin)
    assert sessions.ok(js, "kept") == "yes"
    hang = sessions.cell(js, "await new Promise(() => {})", timeout_s=1.0)
    assert hang.resource_limit_type is ResourceLimitType.TIME
    assert sessions.ok(js, "kept") == "yes"


def test_an_interpreter_that_ignores_the_interrupt_is_killed_and_the_session_ends(sessions: Sessions, py: str) -> None:
    stubborn = sessions.cell(py, "import signal\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\nwhile True:\n    pass", timeout_s=1.0)
    assert stubborn.status is Status.RESOURCE_LIMIT_EXCEEDED and stubborn.exit_code == -124
    _gone(sessions, py)


def test_memory_exhaustion_ends_the_session(sessions: Sessions) -> None:
    session_id = sessions.create("python", limits=Limits(wall_time_s=10, memory_bytes=128 << 20, output_bytes=1 << 20))
    sessions.ok(session_id, "chunks = []")
    hog = sessions.cell(session_id, "while True:\n    chunks.append(bytearray(8 << 20))")
    assert hog.status is Status.RESOURCE_LIMIT_EXCEEDED, sessions.runner.describe(hog)
    assert hog.resource_limit_type is ResourceLimitType.MEMORY
    _gone(sessions, session_id)


def test_exit_ends_the_session(sessions: Sessions, py: str, js: str) -> None:
    sessions.cell(py, "import sys\nsys.exit(3)")
    _gone(sessions, py)
    sessions.cell(js, "process.exit(0)")
    _gone(sessions, js)


def test_idle_session_expires(sessions: Sessions) -> None:
    session_id = sessions.create("python", idle_timeout_s=1)
    sandbox = sessions.sandbox(session_id)
    deadline = time.monotonic() + 15
    while session_id in sessions.manager._sessions and time.monotonic() < deadline:
        time.sleep(0.2)
    _gone(sessions, session_id)
    assert not sandbox.alive()


def test_request_limits_above_the_server_are_refused(sessions: Sessions, py: str) -> None:
    with pytest.raises(BadRequestError):
        sessions.create("python", idle_timeout_s=10**6)
    with pytest.raises(BadRequestError):
        sessions.cell(py, "1", timeout_s=10**4)


def test_max_sessions_is_enforced(sessions: Sessions) -> None:
    made = [sessions.create("python") for _ in range(6 - len(sessions.manager._sessions))]
    try:
        with pytest.raises(LimitExceededError) as refused:
            sessions.create("python")
        assert refused.value.retry_after_s > 0
    finally:
        for session_id in made:
            sessions.delete(session_id)


# -- isolation between sessions -------------------------------------------------------


def test_two_sessions_never_see_each_other(sessions: Sessions) -> None:
    a, b = sessions.create("python"), sessions.create("python")
    try:
        sessions.ok(a, "secret = 'from-a'\nopen('/tmp/a-only', 'w').write('a')\nopen('a-file', 'w').write('a')")
        sessions.call(sessions.manager.put_file(a, "uploaded-to-a", b"a"))
        seen = sessions.ok(b, "import os\n['secret' in globals(), os.path.exists('/tmp/a-only'), sorted(os.listdir('.'))]")
        assert seen == [False, False, ["artifacts"]]
        with pytest.raises(NotFoundError):
            sessions.call(sessions.manager.get_file(b, "a-file"))
    finally:
        sessions.delete(a)
        sessions.delete(b)


def test_concurrent_sessions_each_keep_their_state(sessions: Sessions) -> None:
    import asyncio

    ids = [sessions.create("python") for _ in range(3)]
    try:
        async def steps(session_id: str, n: int) -> list[Any]:
            out = []
            await sessions.manager.execute(session_id, CellRequest(code=f"n = {n}"))
            for _ in range(5):
                result = await sessions.manager.execute(session_id, CellRequest(code="n = n * 2\nn"))
                out.append(result.result.value if result.result else None)
            return out

        async def together() -> list[list[Any]]:
            return await asyncio.gather(*(steps(s, i + 1) for i, s in enumerate(ids)))

        results = sessions.call(together())
        assert results == [[(i + 1) * 2**k for k in range(1, 6)] for i in range(3)]
    finally:
        for session_id in ids:
            sessions.delete(session_id)


# -- nothing left behind --------------------------------------------------------------


def test_deleting_frees_the_sandbox(sessions: Sessions) -> None:
    session_id = sessions.create("python")
    sandbox = sessions.sandbox(session_id)
    sessions.ok(session_id, "import threading, time\nthreading.Thread(target=time.sleep, args=(60,), daemon=True).start()")
    procs = sandbox.cgroup.procs_files()
    assert sandbox.cgroup.pids(), "the session's sandbox runs processes in its cgroup"
    sessions.delete(session_id)
    assert not sandbox.alive()
    assert not [p for p in procs if Path(p).exists()], "the session's cgroup outlived it"
    _gone(sessions, session_id)


def test_closing_the_manager_destroys_every_session(executor: Any) -> None:
    manager = SessionManager(executor.settings, executor.executor)
    executor.loop.run(manager.start(), timeout_s=10)
    own = Sessions(executor, manager)
    ids = [own.create("python"), own.create("nodejs")]
    sandboxes = [own.sandbox(i) for i in ids]
    procs = [p for s in sandboxes for p in s.cgroup.procs_files()]
    executor.loop.run(manager.close(), timeout_s=120)
    assert not any(s.alive() for s in sandboxes)
    assert not [p for p in procs if Path(p).exists()]
