"""Sessions: one sandbox held for one caller, whose interpreter runs cells that share state.

A session's sandbox comes from the same backend, with the same isolation and limits, as a
one-shot execution (``Executor.create_dedicated``: on gVisor it has a gVisor sandbox of its
own), but it is never taken from or returned to a pool: it is destroyed when the session
is closed, idles out (``SANDBOX_SESSION_IDLE_TIMEOUT``), reaches its lifetime
(``SANDBOX_SESSION_MAX_LIFETIME``), or a cell ends its interpreter (memory, a signal, a
time limit the interpreter did not stop at, ``sys.exit``/``process.exit``). Sessions live
in this process only: a restart ends them all, and start-up reaps their sandboxes with
the rest.

Interface (used by the API, MCP and tests):

- ``await manager.create(SessionRequest, owner) -> SessionInfo``
- ``await manager.execute(session_id, CellRequest, owner, on_output=None) -> ExecutionResult``
- ``manager.describe(session_id, owner) -> SessionInfo``
- ``manager.list(owner) -> list[SessionInfo]``
- ``await manager.delete(session_id, owner) -> None``
- ``await manager.put_file(session_id, path, data, owner) -> SessionFile``
- ``await manager.get_file(session_id, path, owner) -> bytes``
- ``await manager.list_files(session_id, owner) -> list[SessionFile]``

``owner`` is the API key's name (None when keys are off): a session of another owner is
:class:`~execbox.errors.NotFoundError`, like an unknown one. Above SANDBOX_MAX_SESSIONS
(or the owner's SANDBOX_KEY_MAX_SESSIONS), ``create`` raises
:class:`~execbox.errors.LimitExceededError`; a bad path is
:class:`~execbox.errors.BadRequestError`. A session id is 32 random hex digits, prefixed
with ``<SANDBOX_REPLICA_NAME>.`` when the replica has a name (see :func:`replica_of`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

from execbox.artifacts import artifact_stamps, collect_artifacts_report
from execbox.errors import BadRequestError, ExecboxError, LimitExceededError, NotFoundError
from execbox.isolation.base import OutputSink, RunOutcome, Sandbox
from execbox.models import (
    Artifact,
    CellRequest,
    ExecutionRequest,
    ExecutionResult,
    Limits,
    ResourceLimitType,
    SessionFile,
    SessionInfo,
    SessionRequest,
    SkippedArtifact,
)
from execbox.service import workspace
from execbox.service.classify import EXIT_INTERNAL, classify, runner_error
from execbox.service.executor import Executor
from execbox.settings import Settings

__all__ = ["SessionManager", "replica_of"]

log = logging.getLogger("execbox.sessions")
T = TypeVar("T")
#: how often idle and expired sessions are looked for
_SWEEP_S = 1.0


def replica_of(session_id: str) -> str:
    """The name of the replica that owns ``session_id`` ('' for an unnamed replica)."""
    return session_id.rpartition(".")[0]


@dataclass
class _Session:
    id: str
    request: SessionRequest
    owner: str | None
    sandbox: Sandbox
    limits: Limits
    idle_timeout_s: float
    created_at: float
    expires_at: float
    last_used_at: float
    executions: int = 0
    closed: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def info(self) -> SessionInfo:
        return SessionInfo(
            id=self.id, language=self.request.language, backend=self.sandbox.backend_name,
            created_at=self.created_at, expires_at=self.expires_at, idle_timeout_s=self.idle_timeout_s,
            last_used_at=self.last_used_at, executions=self.executions, owner=self.owner,
        )  # fmt: skip


class SessionManager:
    """Live sessions of this process; ``start()`` before use, ``close()`` destroys them all."""

    def __init__(self, settings: Settings, executor: Executor) -> None:
        self.settings = settings
        self.executor = executor
        self._sessions: dict[str, _Session] = {}
        self._creating = 0
        self._threads = ThreadPoolExecutor(max_workers=max(2, min(settings.max_sessions, 64)), thread_name_prefix="execbox-session")
        self._sweeper: asyncio.Task[None] | None = None
        self._closing = False

    async def start(self) -> None:
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep(), name="execbox-session-sweeper")

    async def close(self) -> None:
        self._closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        await asyncio.gather(*(self._end(s, "the service is stopping") for s in list(self._sessions.values())))
        self._threads.shutdown(wait=True)

    def count(self) -> int:
        """Live sessions (for /metrics)."""
        return len(self._sessions)

    # -- lifecycle -----------------------------------------------------------------

    async def create(self, request: SessionRequest, owner: str | None = None) -> SessionInfo:
        """A new session with its sandbox started and its environment set."""
        limits = self.executor.limits_for(ExecutionRequest(language=request.language, code="", limits=request.limits))
        idle_s = self.settings.session_idle_timeout
        if request.idle_timeout_s is not None:
            if not 0 < request.idle_timeout_s <= idle_s:
                raise BadRequestError(f"idle_timeout_s must be above 0 and at most the server's {idle_s:g} s")
            idle_s = request.idle_timeout_s
        self._admit(owner)
        self._creating += 1
        try:
            sandbox = await self.executor.create_dedicated(request.language, request.packages)
        finally:
            self._creating -= 1
        now = time.time()
        session = _Session(
            id=self._new_id(), request=request, owner=owner, sandbox=sandbox, limits=limits, idle_timeout_s=idle_s,
            created_at=now, expires_at=now + self.settings.session_max_lifetime, last_used_at=now,
        )  # fmt: skip
        self._sessions[session.id] = session
        # the first cell sets the session's environment and proves the interpreter answers
        setup = ExecutionRequest(language=request.language, code="", env=request.env)
        outcome = await self._run(session, lambda: sandbox.run_cell(setup, limits, limits.wall_time_s))
        if outcome is None or outcome.report is None or outcome.report.exit_code != 0:
            await self._end(session, "its interpreter did not start")
            said = (outcome.stderr.decode("utf-8", "replace").strip() if outcome else "") or "no answer"
            raise ExecboxError(f"the session's sandbox did not start: {said}")
        log.info("session %s created (%s, %s backend)", session.id, request.language.value, sandbox.backend_name)
        return session.info()

    def _admit(self, owner: str | None) -> None:
        if self._closing:
            raise LimitExceededError("the service is stopping", retry_after_s=5.0)
        cap = self.settings.max_sessions
        if len(self._sessions) + self._creating >= cap:
            raise LimitExceededError(f"{cap} sessions are live, the most this service holds (SANDBOX_MAX_SESSIONS)", 5.0)
        per_key = getattr(self.settings, "key_max_sessions", 0) or 0
        if owner is not None and per_key and sum(s.owner == owner for s in self._sessions.values()) >= per_key:
            raise LimitExceededError(f"this key holds {per_key} sessions, its most (SANDBOX_KEY_MAX_SESSIONS)", 5.0)

    def _new_id(self) -> str:
        token = secrets.token_hex(16)
        return f"{self.settings.replica_name}.{token}" if self.settings.replica_name else token

    def _get(self, session_id: str, owner: str | None) -> _Session:
        session = self._sessions.get(session_id)
        if session is None or session.closed or session.owner != owner:
            raise NotFoundError(f"no session {session_id!r}: unknown, closed or expired")
        return session

    def describe(self, session_id: str, owner: str | None = None) -> SessionInfo:
        return self._get(session_id, owner).info()

    def list(self, owner: str | None = None) -> list[SessionInfo]:
        return [s.info() for s in self._sessions.values() if not s.closed and s.owner == owner]

    async def delete(self, session_id: str, owner: str | None = None) -> None:
        await self._end(self._get(session_id, owner), "closed by its caller")

    async def _end(self, session: _Session, why: str) -> None:
        """Close the session: its sandbox is destroyed (after a cell that is still running)."""
        if session.closed:
            return
        session.closed = True
        self._sessions.pop(session.id, None)
        session.sandbox.abort()
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._threads, session.sandbox.destroy)
        except (ExecboxError, OSError) as exc:
            log.error("destroying the sandbox of session %s failed: %s", session.id, exc)
        log.info("session %s ended: %s", session.id, why)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(_SWEEP_S)
            now = time.time()
            for session in list(self._sessions.values()):
                if now >= session.expires_at:
                    await self._end(session, "it reached SANDBOX_SESSION_MAX_LIFETIME")
                elif not session.lock.locked() and now - session.last_used_at >= session.idle_timeout_s:
                    await self._end(session, "it was idle for its idle timeout")
                elif not session.lock.locked() and not session.sandbox.alive():
                    await self._end(session, "its interpreter ended")

    # -- cells -----------------------------------------------------------------------

    async def _run(self, session: _Session, work: Callable[[], T]) -> T:
        """``work()`` in a worker thread; a caller that goes away ends the session (the cell
        cannot be taken back from an interpreter that is running it)."""
        future = asyncio.get_running_loop().run_in_executor(self._threads, work)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            session.sandbox.abort()
            future.add_done_callback(lambda _: None)
            asyncio.get_running_loop().create_task(self._end(session, "its caller went away during a cell"))
            raise

    async def execute(
        self, session_id: str, cell: CellRequest, owner: str | None = None, on_output: OutputSink | None = None
    ) -> ExecutionResult:
        """Run one cell; every outcome of the program is a verdict, and a verdict that ended
        the interpreter ends the session (later calls: NotFoundError)."""
        session = self._get(session_id, owner)
        language = session.request.language
        timeout_s = session.limits.wall_time_s
        if cell.timeout_s is not None:
            if not 0 < cell.timeout_s <= timeout_s:
                raise BadRequestError(f"timeout_s must be above 0 and at most the session's {timeout_s:g} s")
            timeout_s = cell.timeout_s
        started = time.perf_counter()
        request = ExecutionRequest(language=language, code=cell.code, stdin=cell.stdin)
        async with session.lock:
            if session.closed:
                raise NotFoundError(f"no session {session_id!r}: unknown, closed or expired")
            if (blocked := self.executor.check_code(cell.code, language)) is not None:
                result = blocked
            else:
                result = await self._cell(session, request, timeout_s, on_output)
            session.executions += 1
            session.last_used_at = time.time()
        self.executor.log_execution(request, result, started, session_id=session.id)
        return result

    async def _cell(
        self, session: _Session, request: ExecutionRequest, timeout_s: float, on_output: OutputSink | None
    ) -> ExecutionResult:
        sandbox = session.sandbox

        def run() -> tuple[RunOutcome, tuple[Artifact, ...], tuple[SkippedArtifact, ...]]:
            before = self._with_workspace(sandbox, artifact_stamps) or {}
            outcome = sandbox.run_cell(request, session.limits, timeout_s, on_output)
            found = self._with_workspace(sandbox, lambda fd: collect_artifacts_report(fd, before)) if outcome.report else None
            return outcome, *(found or ((), ()))

        try:
            outcome, artifacts, skipped = await self._run(session, run)
        except (ExecboxError, OSError) as exc:
            log.error("cell of session %s failed: %s", session.id, exc)
            await self._end(session, "its sandbox failed")
            return runner_error(EXIT_INTERNAL, "internal_error", f"{type(exc).__name__}: {exc}\n")
        result = classify(
            outcome, wall_time_s=timeout_s, artifacts=artifacts, artifacts_skipped=skipped, backend=sandbox.backend_name
        )
        if outcome.report is None or result.resource_limit_type is ResourceLimitType.MEMORY or not sandbox.alive():
            await self._end(session, f"a cell ended its interpreter ({result.detail})")
        return result

    @staticmethod
    def _with_workspace(sandbox: Sandbox, use: Callable[[int], T]) -> T | None:
        try:
            fd = sandbox.open_workspace()
        except (OSError, ExecboxError) as exc:
            log.warning("cannot open the workspace of sandbox %s: %s", sandbox.id, exc)
            return None
        try:
            return use(fd)
        finally:
            os.close(fd)

    # -- files -----------------------------------------------------------------------

    async def _files(self, session_id: str, owner: str | None, use: Callable[[int], T]) -> T:
        session = self._get(session_id, owner)
        async with session.lock:
            if session.closed:
                raise NotFoundError(f"no session {session_id!r}: unknown, closed or expired")
            session.last_used_at = time.time()

            def work() -> T:
                fd = session.sandbox.open_workspace()
                try:
                    return use(fd)
                finally:
                    os.close(fd)

            return await self._run(session, work)

    async def put_file(self, session_id: str, path: str, data: bytes, owner: str | None = None) -> SessionFile:
        workspace.split_path(path)
        return await self._files(session_id, owner, lambda fd: workspace.write_file(fd, path, data))

    async def get_file(self, session_id: str, path: str, owner: str | None = None) -> bytes:
        workspace.split_path(path)
        return await self._files(session_id, owner, lambda fd: workspace.read_file(fd, path, self.settings.max_disk))

    async def list_files(self, session_id: str, owner: str | None = None) -> list[SessionFile]:
        return await self._files(session_id, owner, workspace.list_files)
