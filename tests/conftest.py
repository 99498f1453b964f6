"""Shared fixtures of the contract and escape suites.

* ``backend_name`` is parametrised over every backend execbox knows; ``sandbox_backend``
  builds and checks it, and *skips* (with the reason, shown by ``-ra``) when it cannot
  run on this host, or when the tests do not run as root. Nothing passes silently.
* ``executor`` is one :class:`~execbox.service.executor.Executor` per backend per test
  module (pool size 1, code check off), running on an event loop that lives in a
  background thread for the whole session; tests call it synchronously through
  :class:`SandboxRunner`.
* Every sandbox an executor of this session creates is recorded (backend, id), so that the
  escape suite can check that none of them left anything behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import tempfile
import textwrap
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from execbox.errors import BackendUnavailableError
from execbox.isolation.base import IsolationBackend, Sandbox
from execbox.models import ExecutionRequest, ExecutionResult, Language, Limits, Status
from execbox.service.backends import BACKENDS
from execbox.settings import Settings

#: every backend of the registry that settings may name, in every mode it declares (e.g. the
#: namespaces backend with each launcher, fork server and bwrap; gVisor with two walls, a pool
#: of 1 so that successive executions really share one gVisor sandbox, and single-use):
#: variant name -> (backend, settings of the mode); unavailable ones are skipped, with the reason
_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    variant: (entry.name, dict(overrides))
    for entry in BACKENDS
    if entry.from_settings
    for variant, overrides in ((entry.name, ()), *((f"{entry.name}-{m}", o) for m, o in entry.modes))
}
BACKEND_VARIANTS: dict[str, dict[str, Any]] = {variant: overrides for variant, (_, overrides) in _VARIANTS.items()}
BACKEND_NAMES = tuple(BACKEND_VARIANTS)


def base_backend(variant: str) -> str:
    """The backend a variant is a mode of (``gvisor-single`` -> ``gvisor``)."""
    return _VARIANTS[variant][0]
#: the limits the suites rely on, fixed here rather than taken from the environment (other
#: settings, e.g. SANDBOX_ENABLE_NETWORK or SANDBOX_FORKSERVER, are the configured ones)
SANDBOX_SETTINGS = {
    "code_check": "off",
    "executor_manager_pool_size": 1,
    "timeout": "10s",
    "max_memory": "256m",
    "max_output": "1m",
    "max_disk": "64m",
    "max_pids": 128,
    "cpus": 1.0,
    "pool_wait": "60s",
}

T = TypeVar("T")


class LoopThread:
    """An asyncio event loop running in a daemon thread; coroutines are submitted to it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-event-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout_s)
        except TimeoutError:
            future.cancel()
            raise

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self.loop.close()


@dataclass
class CreatedSandboxes:
    """(backend name, sandbox id) of every sandbox the session's executors created."""

    items: list[tuple[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ids(self, backend_name: str) -> list[str]:
        with self.lock:
            return [sid for name, sid in self.items if name == backend_name]

    def record(self, backend: IsolationBackend) -> None:
        """Wrap ``backend.create`` (an instance attribute shadows the method) to note each id:
        the host-side sandbox's (with gVisor's two walls, the long-lived gVisor sandbox's)."""
        create = backend.create
        variant = getattr(backend, "variant", backend.name)

        def recording_create(spec: Any) -> Sandbox:
            sandbox = create(spec)
            with self.lock:
                self.items.append((variant, getattr(sandbox, "container_id", sandbox.id)))
            return sandbox

        backend.create = recording_create  # type: ignore[method-assign]


@dataclass
class SandboxRunner:
    """Synchronous face of one started Executor, for the tests."""

    loop: LoopThread
    executor: Any
    backend_name: str
    settings: Settings

    @property
    def inner_wall(self) -> bool:
        """Whether executions run in the fork server's / bwrap's inner sandbox (with the built-in
        seccomp filter): the namespaces backend, and gVisor with two walls."""
        backend = self.executor.backend
        return backend.name == "namespaces" or getattr(backend, "mode", "") == "two-walls"

    def limits(self, **overrides: Any) -> Limits:
        """The server's limits with some fields lowered (within Executor.limits_for's maxima)."""
        return self.settings.default_limits().model_copy(update=overrides)

    def run(
        self,
        code: str,
        language: str = "python",
        arguments: dict[str, Any] | None = None,
        limits: Limits | None = None,
        **extra: Any,
    ) -> ExecutionResult:
        request = ExecutionRequest(
            language=Language(language),
            code=textwrap.dedent(code).lstrip("\n"),
            arguments=arguments or {},
            limits=limits,
            **extra,
        )
        wall_s = (limits or self.settings.default_limits()).wall_time_s
        return self.loop.run(self.executor.execute(request), timeout_s=wall_s + 120)

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        """Until every pool has a warm sandbox (e.g. before inspecting them from the host)."""
        assert self.loop.run(self.executor.wait_ready(timeout_s), timeout_s=timeout_s + 30), self.executor.pool_stats()

    @staticmethod
    def describe(result: ExecutionResult) -> str:
        """A short description of a result for assertion messages."""
        return (
            f"status={result.status.value} exit={result.exit_code} detail={result.detail} "
            f"stdout={result.stdout[-800:]!r} stderr={result.stderr[-1500:]!r}"
        )

    def assert_still_works(self, languages: tuple[str, ...] = ("python",)) -> None:
        """The next execution after a hostile one runs normally (in each of ``languages``)."""
        if "python" in languages:
            py = self.run("def main(n):\n    print('alive', n)\n    return n + 1\n", arguments={"n": 41})
            assert py.status is Status.SUCCESS, self.describe(py)
            assert py.stdout == "alive 41\n"
            assert py.result is not None and py.result.value == 42
        if "nodejs" not in languages:
            return
        js = self.run("function main(args) { console.log('alive', args.n); return args.n + 1; }", "nodejs", {"n": 1})
        assert js.status is Status.SUCCESS, self.describe(js)
        assert js.stdout == "alive 1\n"
        assert js.result is not None and js.result.value == 2


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("sandbox suites need root (cgroups, per-sandbox uids, runsc): run pytest as root")


# -- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def sandbox_settings() -> Iterator[Settings]:
    """The suites' settings, with a private state directory.

    Its ``runtimes`` is a link to the configured (built) runtime environments; everything
    else (cgroup names, runsc state, workspaces) is the session's own, so that a service or
    another test session on the same host neither disturbs nor is disturbed by this one.
    """
    configured = Settings.load(**SANDBOX_SETTINGS)
    state_dir = Path(tempfile.mkdtemp(prefix="execbox-tests-"))
    state_dir.chmod(0o755)  # sandbox uids traverse it to reach their read-only binds
    (state_dir / "runtimes").symlink_to(configured.runtime_dir.resolve(), target_is_directory=True)
    try:
        yield Settings.load(**SANDBOX_SETTINGS, state_dir=state_dir)
    finally:
        mounted = [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if str(state_dir) in line]
        if not mounted:  # never delete through a mount a broken teardown left behind
            shutil.rmtree(state_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def event_loop_thread() -> Iterator[LoopThread]:
    loop = LoopThread()
    yield loop
    loop.close()


@pytest.fixture(scope="session")
def created_sandboxes() -> CreatedSandboxes:
    return CreatedSandboxes()


@pytest.fixture(scope="session")
def _backend_unavailable() -> dict[str, str]:
    """Why a backend was found unusable (checked once per session)."""
    return {}


@pytest.fixture(scope="module", params=BACKEND_NAMES)
def backend_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def sandbox_backend(
    backend_name: str, sandbox_settings: Settings, _backend_unavailable: dict[str, str]
) -> IsolationBackend:
    """The named backend, built and checked; skips with the reason if it cannot run here."""
    require_root()
    if backend_name in _backend_unavailable:
        pytest.skip(f"{backend_name} backend unavailable: {_backend_unavailable[backend_name]}")
    from execbox.service.backends import build_backend

    try:
        settings = sandbox_settings.model_copy(update=BACKEND_VARIANTS.get(backend_name, {}))
        backend = build_backend(base_backend(backend_name), settings)
        backend.check()
        backend.variant = backend_name  # type: ignore[attr-defined]
    except (BackendUnavailableError, ImportError) as exc:
        _backend_unavailable[backend_name] = str(exc) or type(exc).__name__
        pytest.skip(f"{backend_name} backend unavailable: {_backend_unavailable[backend_name]}")
    return backend


@pytest.fixture(scope="module")
def sandbox_host_env() -> Iterator[None]:
    """Hook run before the executor starts (the escape suite plants a secret here)."""
    yield


@contextlib.contextmanager
def started_executor(
    backend: IsolationBackend, settings: Settings, loop: LoopThread, created: CreatedSandboxes
) -> Iterator[SandboxRunner]:
    """A started Executor (both languages, pool size 1, every sandbox recorded); closed on exit."""
    from execbox.service.executor import Executor

    created.record(backend)
    ex = Executor(settings, backend=backend, pool_size=1)

    async def start() -> None:
        await ex.start()
        if not await ex.wait_ready(120):
            raise RuntimeError(f"no sandbox became ready: {ex.pool_stats()}")

    try:
        loop.run(start(), timeout_s=180)
    except BaseException:
        with contextlib.suppress(Exception):
            loop.run(ex.close(), timeout_s=120)
        raise
    try:
        yield SandboxRunner(loop, ex, backend.name, settings)
    finally:
        loop.run(ex.close(), timeout_s=120)


@pytest.fixture(scope="module")
def executor(
    sandbox_backend: IsolationBackend,
    sandbox_host_env: None,
    sandbox_settings: Settings,
    event_loop_thread: LoopThread,
    created_sandboxes: CreatedSandboxes,
) -> Iterator[SandboxRunner]:
    """One started Executor (both languages, pool size 1) for this module and backend."""
    with started_executor(sandbox_backend, sandbox_settings, event_loop_thread, created_sandboxes) as runner:
        yield runner


@pytest.fixture(scope="session")
def start_executor(
    sandbox_settings: Settings, event_loop_thread: LoopThread, created_sandboxes: CreatedSandboxes
) -> Any:
    """``with start_executor(backend) as runner:`` for a test that must close its executor itself
    (``settings``: other settings than the session's, e.g. ``sandbox_settings.model_copy(...)``)."""

    def start(backend: IsolationBackend, settings: Settings | None = None) -> contextlib.AbstractContextManager[SandboxRunner]:
        return started_executor(backend, settings or sandbox_settings, event_loop_thread, created_sandboxes)

    return start


@pytest.fixture
def egress_log() -> Iterator[list[dict[str, Any]]]:
    """The egress proxy's log lines (one JSON object per connection) while the test runs."""
    seen: list[dict[str, Any]] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(json.loads(record.getMessage().removeprefix("egress ")))

    handler, logger = Catch(), logging.getLogger("execbox.egress")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield seen
    logger.removeHandler(handler)
