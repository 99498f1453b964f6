"""The one place that turns an ExecutionRequest into an ExecutionResult.

policy check -> lease a warm sandbox -> run -> collect artifacts -> classify -> destroy.
A request with ``packages`` runs instead in a sandbox built for it with its package layer
(``create_dedicated``; see :mod:`execbox.service.packages`); the pools never see it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

from execbox.artifacts import collect_artifacts_report
from execbox.egress_rules import EgressRule
from execbox.errors import (
    BadRequestError,
    ExecboxError,
    PackageInstallError,
    PoolBusyError,
    PoolClosedError,
    QueueFullError,
    RuntimeEnvironmentError,
)
from execbox.isolation.base import IsolationBackend, OutputSink, RunOutcome, Sandbox, SandboxSpec
from execbox.models import Artifact, ExecutionRequest, ExecutionResult, Language, Limits, SkippedArtifact
from execbox.policy import Finding, imports_only_stdlib, inspect_code
from execbox.pool import PoolStats, SandboxPool
from execbox.runtimes import get_runtime
from execbox.service.backends import select_backend
from execbox.service.egress import EgressCaps, EgressMetrics, EgressProxy, execution_rules, with_proxy
from execbox.service.classify import (
    EXIT_BUSY,
    EXIT_INTERNAL,
    EXIT_UNSAFE,
    classify,
    runner_error,
)
from execbox.service.packages import LayeredSandbox, PackageCache, package_spec, packages_backend
from execbox.service.metrics import ServiceMetrics
from execbox.service.specs import sandbox_spec
from execbox.settings import CodeCheckMode, Settings

__all__ = ["Executor", "busy_result", "check_environments"]

log = logging.getLogger("execbox.executor")
executions_log = logging.getLogger("execbox.executions")
#: a line of a blocked request's stderr: ``Line N: <finding> [<rule>]`` (policy.findings.Finding)
_FINDING_LINE = re.compile(r"^Line (\d+): .*?(?: \[([\w-]+)\])?$", re.MULTILINE)
#: how many verdicts of the static code check are remembered (by a digest of the code)
_CODE_CHECK_CACHE_SIZE = 1024


class _CodeMemo:
    """What a pure function said of a code, for the last ``size`` codes, by a digest of the
    code (never the code itself: a cache of 1024 codes of up to SANDBOX_MAX_CODE_SIZE each
    would hold a gigabyte). A caller such as RAGFlow sends the same code many times with
    other arguments; each answer then costs a hash instead of a parse."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._items: collections.OrderedDict[tuple[Any, ...], Any] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: tuple[Any, ...], code: str, compute: Callable[[str], Any]) -> Any:
        key = (*key, hashlib.blake2b(code.encode("utf-8", "surrogatepass"), digest_size=32).digest())
        value = self._items.get(key)
        if value is None:
            value = self._items[key] = compute(code)
            if len(self._items) > self._size:
                self._items.popitem(last=False)
        else:
            self._items.move_to_end(key)
        return value


def check_environments(settings: Settings, languages: tuple[Language, ...] | None = None) -> list[str]:
    """RuntimeEnvironmentError, with the command that builds them, when a runtime
    environment of ``languages`` (default: SANDBOX_LANGUAGES) is missing; no warnings otherwise."""
    languages = settings.served_languages if languages is None else languages
    missing = [rt for rt in map(get_runtime, languages) if not rt.env_dir(settings.runtime_dir).is_dir()]
    if missing:
        names = ", ".join(rt.name for rt in missing)
        served = [language.value for language in languages if language not in {rt.language for rt in missing}]
        drop = f", or serve only {','.join(served)} with SANDBOX_LANGUAGES={','.join(served)}" if served else ""
        raise RuntimeEnvironmentError(
            f"the {names} runtime environment is missing under {settings.runtime_dir}: "
            f"build it with `execbox build` (or `make build`){drop}"
        )
    return []


def busy_result() -> ExecutionResult:
    """The verdict of a request that found no sandbox: within SANDBOX_POOL_WAIT, or (on /run) a full queue."""
    return runner_error(EXIT_BUSY, "no_available_container", "Container pool is busy\n")


class Executor:
    """Runs requests in fresh sandboxes from warm pools. Use ``async with`` or start()/close()."""

    def __init__(
        self,
        settings: Settings,
        backend: IsolationBackend | None = None,
        languages: tuple[Language, ...] | None = None,
        pool_size: int | None = None,
        metrics: ServiceMetrics | None = None,
    ) -> None:
        self.settings = settings
        #: the Prometheus series of this executor (its own registry unless one is given)
        self.metrics = metrics or ServiceMetrics()
        self.metrics.read_pools(self.pool_stats)
        self.metrics.read_build(self._build_info)
        self.metrics.read_packages(lambda: self.packages.stats())
        self.backend = backend
        self.warnings: list[str] = []
        self._languages = settings.served_languages if languages is None else languages
        self._pool_size = settings.executor_manager_pool_size if pool_size is None else pool_size
        #: by (language, light): the light pools' sandboxes have no preloaded modules
        self._pools: dict[tuple[Language, bool], SandboxPool] = {}
        workers = max(4, 4 * max(self._pool_size, 1) * len(self._languages))
        self._run_threads = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="execbox-run")
        self._build_threads = ThreadPoolExecutor(max_workers=4, thread_name_prefix="execbox-build")
        self._closing = False
        self._dedicated_specs: dict[Language, SandboxSpec] = {}
        #: the package layers (SANDBOX_PACKAGES), and the backend that builds their sandboxes
        self.packages = PackageCache(settings)
        self._packages_backend: IsolationBackend | None = None
        self._destroying: set[asyncio.Future[None]] = set()
        #: the code check's findings by (language, mode, code), and whether a code imports
        #: only the standard library (both pure)
        self._findings = _CodeMemo(_CODE_CHECK_CACHE_SIZE)
        self._light_codes = _CodeMemo(_CODE_CHECK_CACHE_SIZE)
        self._egress_rules = settings.egress_rules
        #: the egress proxy (docs/egress.md), when the server has an allowlist
        self.egress: EgressProxy | None = None
        if self._egress_rules:
            uids = range(settings.uid_base, settings.uid_base + settings.uid_count)
            self.egress = EgressProxy(EgressCaps.from_settings(settings), uids=uids)
            self.metrics.registry.register(EgressMetrics(self.egress))

    def _check_environments(self) -> None:
        self.warnings.extend(check_environments(self.settings, self._languages))

    async def start(self) -> None:
        """Pick and check the backend, reap a crashed predecessor's leftovers, fill the pools."""
        loop = asyncio.get_running_loop()
        self._check_environments()
        if self.backend is None:
            self.backend, warnings = await loop.run_in_executor(self._build_threads, select_backend, self.settings)
            self.warnings.extend(warnings)
        reaped = await loop.run_in_executor(self._build_threads, self.backend.reap)
        if reaped:
            log.warning("reaped %d sandbox(es) left by a previous run", reaped)
        if self.egress is not None:
            self.egress.start()
        for language in self._languages:
            spec = sandbox_spec(self.settings, get_runtime(language), self.egress)
            kinds = [(False, spec, "")]
            if self.settings.python_light and self.backend.preloads(spec):
                kinds.append((True, spec.without_preloads(), "/light"))
            for light, kind_spec, suffix in kinds:
                pool = SandboxPool(
                    f"{language.value}/{self.backend.name}{suffix}",
                    partial(self.backend.create, kind_spec),
                    self._pool_size,
                    self._build_threads,
                    queue_max=self.settings.queue_max,
                )
                pool.start()
                self._pools[language, light] = pool
        self.warnings.extend(await loop.run_in_executor(self._build_threads, self.packages.start))

    async def __aenter__(self) -> Executor:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop taking work, let running executions finish, destroy every sandbox."""
        self._closing = True
        await asyncio.gather(*(pool.close() for pool in self._pools.values()))
        self._run_threads.shutdown(wait=True)
        await asyncio.gather(*self._destroying)
        # the backend before the build threads: a fork server dies with the thread that
        # started it (its parent-death signal), which must not look like a crash
        self.packages.close()
        if self._packages_backend not in (None, self.backend):
            self._packages_backend.close()
        if self.backend is not None:
            self.backend.close()
        self._build_threads.shutdown(wait=True)
        if self.egress is not None:
            self.egress.shutdown()

    async def wait_ready(self, timeout_s: float = 60.0) -> bool:
        results = await asyncio.gather(*(pool.wait_ready(timeout_s) for pool in self._pools.values()))
        return all(results)

    def pool_stats(self) -> list[PoolStats]:
        return [pool.stats() for pool in self._pools.values()]

    @property
    def backend_info(self) -> dict[str, Any]:
        """The backend's own description: runsc version, platform and mode for gVisor..."""
        return self.backend.describe() if self.backend is not None else {}

    def _build_info(self) -> dict[str, str]:
        from execbox import __version__

        return {"version": __version__, "runsc_version": str(self.backend_info.get("runsc_version") or "")}

    @property
    def backend_name(self) -> str | None:
        return self.backend.name if self.backend else None

    def limits_for(self, request: ExecutionRequest) -> Limits:
        """The request's limits, each at most the server's; BadRequestError above a maximum."""
        maxima = self.settings.default_limits()
        if request.limits is None:
            return maxima
        above = [
            f"{name} {getattr(request.limits, name)} > {getattr(maxima, name)}"
            for name in Limits.model_fields
            if getattr(request.limits, name) > getattr(maxima, name)
        ]
        if above:
            raise BadRequestError("limits above the server's maxima: " + ", ".join(above))
        return request.limits

    def egress_rules_for(self, request: ExecutionRequest) -> tuple[EgressRule, ...]:
        """The request's egress rules (the server's unless it narrows them); BadRequestError
        for a bad pattern or one the server's allowlist does not cover."""
        return execution_rules(request, self._egress_rules)

    async def execute(self, request: ExecutionRequest, on_output: OutputSink | None = None) -> ExecutionResult:
        """Run one request; every failure of the user's program is a verdict, not an exception.

        ``on_output``, if given, is called from a worker thread with ("stdout" | "stderr",
        bytes) as the program prints (the result still carries the whole output).

        QueueFullError when no sandbox is ready and SANDBOX_QUEUE_MAX requests of the language
        already wait: an admission refusal before anything ran, which the caller answers
        (``/run`` with :func:`busy_result`, ``/v1`` with 503 and Retry-After)."""
        started = time.perf_counter()
        result = await self._execute(request, on_output)
        self.log_execution(request, result, started)
        return result

    def check_code(self, code: str, language: Language) -> ExecutionResult | None:
        """The static inspection (SANDBOX_CODE_CHECK): the verdict on code it blocks, else None."""
        if self.settings.code_check is CodeCheckMode.OFF:
            return None
        findings = self._inspect(code, language)
        if findings and self.settings.code_check in (CodeCheckMode.BLOCK, CodeCheckMode.GUARD):
            self.metrics.observe_blocked(language.value, {f.rule or "unnamed" for f in findings})
            return runner_error(EXIT_UNSAFE, "Code is unsafe", "\n".join(map(str, findings)) + "\n")
        for finding in findings:
            log.warning("code check (warn mode): %s", finding)
        return None

    def _inspect(self, code: str, language: Language) -> tuple[Finding, ...]:
        """``inspect_code`` under SANDBOX_CODE_CHECK, remembered for the last
        ``_CODE_CHECK_CACHE_SIZE`` codes (a parse of the code per request otherwise)."""
        mode = self.settings.code_check
        return self._findings.get((language, mode), code, lambda c: tuple(inspect_code(c, language.value, mode)))

    def _pool_for(self, request: ExecutionRequest) -> SandboxPool | None:
        """The light pool for code that imports only the standard library, where the language
        has one (SANDBOX_PYTHON_LIGHT), else the language's pool with the preloaded modules."""
        light = self._pools.get((request.language, True))
        if light is not None and self._light_codes.get((), request.code, imports_only_stdlib):
            return light
        return self._pools.get((request.language, False))

    def dedicated_spec(self, language: Language) -> SandboxSpec:
        """The spec of a sandbox held by one session (the pools' spec, with an outer wall of its own)."""
        spec = self._dedicated_specs.get(language)
        if spec is None:
            spec = dataclasses.replace(sandbox_spec(self.settings, get_runtime(language), self.egress), dedicated=True)
            spec = self._dedicated_specs.setdefault(language, spec)
        return spec

    async def create_dedicated(self, language: Language, packages: tuple[str, ...] = ()) -> Sandbox:
        """A new sandbox for a session (or a request with ``packages``: then with their layer
        mounted, installed first if needed), never taken from nor returned to a pool.
        BadRequestError for packages refused; PackageInstallError when installing failed."""
        requirements = self.packages.check(language, packages)
        if self.backend is None or self._closing:
            raise PoolClosedError("the executor is not running")
        if language not in self._languages:
            raise BadRequestError(f"{language.value} is not served here")
        loop = asyncio.get_running_loop()
        spec = self.dedicated_spec(language)
        if not requirements:
            return await loop.run_in_executor(self._build_threads, self.backend.create, spec)
        lease = await self.packages.acquire(language, requirements, spec.runtime_env_dir)
        try:
            backend = self.backend
            if lease.path is not None:  # else the runtime has them all: nothing to mount
                spec = package_spec(spec, lease.path)
                if self._packages_backend is None:
                    self._packages_backend = packages_backend(self.backend, self.settings)
                backend = self._packages_backend
            sandbox = await loop.run_in_executor(self._build_threads, backend.create, spec)
        except BaseException:
            lease.release()
            raise
        return LayeredSandbox(sandbox, lease)

    async def prepare_packages(self, language: Language, packages: tuple[str, ...]) -> None:
        """Install ``packages`` now if they are not cached (BadRequestError if refused), so that
        a refusal comes before anything runs; a failure to install is left to the verdict."""
        requirements = self.packages.check(language, packages)
        if language not in self._languages:
            raise BadRequestError(f"{language.value} is not served here")
        with contextlib.suppress(PackageInstallError):
            lease = await self.packages.acquire(language, requirements, self.dedicated_spec(language).runtime_env_dir)
            lease.release()

    def _destroy_later(self, sandbox: Sandbox) -> None:
        """Destroy a sandbox used once (not a pool's) in a build thread; close() waits for it."""
        try:
            future = asyncio.get_running_loop().run_in_executor(self._build_threads, sandbox.destroy)
        except RuntimeError:  # the executor has closed its threads: destroy it here and now
            sandbox.destroy()
            return
        future.add_done_callback(lambda f: f.exception() and log.error("destroying %s: %s", sandbox.id, f.exception()))
        self._destroying.add(future)
        future.add_done_callback(self._destroying.discard)

    async def _execute(self, request: ExecutionRequest, on_output: OutputSink | None) -> ExecutionResult:
        limits = self.limits_for(request)
        rules = self.egress_rules_for(request)
        request = with_proxy(request, rules)
        if (blocked := self.check_code(request.code, request.language)) is not None:
            return blocked
        pool = self._pool_for(request)
        if pool is None or self._closing:
            return runner_error(EXIT_INTERNAL, "internal_error", f"no {request.language.value} pool is running\n")
        give_back = pool.release
        waited_from = time.perf_counter()
        try:
            if request.packages:
                sandbox, give_back = await self.create_dedicated(request.language, request.packages), self._destroy_later
            else:
                sandbox = await pool.lease(self.settings.pool_wait)
                self.metrics.observe_pool_wait(pool.name, time.perf_counter() - waited_from)
        except QueueFullError:
            raise
        except PoolBusyError:
            self.metrics.observe_pool_wait(pool.name, time.perf_counter() - waited_from)
            return busy_result()
        except PackageInstallError as exc:
            log.warning("packages of a %s request not installed: %s", request.language.value, exc)
            return runner_error(EXIT_INTERNAL, "package_install_failed", f"installing the packages failed: {exc}\n")
        except BadRequestError:
            raise
        except ExecboxError as exc:  # PoolClosedError, or a pool that cannot build sandboxes
            log.error("no sandbox for a %s request: %s", request.language.value, exc)
            return runner_error(EXIT_INTERNAL, "internal_error", f"{exc}\n")
        loop = asyncio.get_running_loop()
        egress = self.egress.session(sandbox.egress_key, sandbox.id, rules) if self.egress else contextlib.nullcontext()
        work = loop.run_in_executor(self._run_threads, _run_in_sandbox, sandbox, request, limits, on_output, egress)
        try:
            outcome, artifacts, skipped = await asyncio.shield(work)
        except asyncio.CancelledError:
            # the caller went away (a closed connection, a client timeout): stop the program
            # now; the sandbox is released once the worker thread has let go of it
            sandbox.abort()
            work.add_done_callback(lambda _: give_back(sandbox))
            raise
        except (ExecboxError, OSError) as exc:
            give_back(sandbox)
            log.error("execution in sandbox %s failed: %s", sandbox.id, exc)
            return runner_error(EXIT_INTERNAL, "internal_error", f"{type(exc).__name__}: {exc}\n")
        give_back(sandbox)
        return classify(
            outcome, wall_time_s=limits.wall_time_s, artifacts=artifacts, artifacts_skipped=skipped,
            backend=sandbox.backend_name,
        )

    def log_execution(
        self, request: ExecutionRequest, result: ExecutionResult, started: float, session_id: str | None = None
    ) -> None:
        """One JSON line per execution (or session cell), and its metrics: never its code or output."""
        self.metrics.observe_execution(
            request.language.value, result.backend or self.backend_name, result.status.value, time.perf_counter() - started
        )
        record: dict[str, Any] = {
            "language": request.language.value,
            "status": result.status.value,
            "exit_code": result.exit_code,
            "detail": result.detail,
            "time_used_ms": result.time_used_ms,
            "memory_used_kb": result.memory_used_kb,
            "total_ms": round((time.perf_counter() - started) * 1000, 3),
            "code_bytes": len(request.code.encode("utf-8", "surrogatepass")),
            "stdout_bytes": len(result.stdout),
            "stderr_bytes": len(result.stderr),
            "artifacts": len(result.artifacts),
            "backend": result.backend,
        }
        if session_id is not None:
            record["session"] = session_id
        if result.exit_code == EXIT_UNSAFE and result.detail == "Code is unsafe":
            # which rule refused which line (from check_code's own stderr); never the code, nor the
            # finding's text (it quotes the code)
            record["code_check"] = [
                {"line": int(line), "rule": rule or "unnamed"} for line, rule in _FINDING_LINE.findall(result.stderr)
            ]
        # as text, the fields follow the word; a JSON log renders them as keys (execbox.api.logs)
        executions_log.info("execution %s", json.dumps(record), extra={"execution": record, "summary": "execution"})


def _run_in_sandbox(
    sandbox: Sandbox,
    request: ExecutionRequest,
    limits: Limits,
    on_output: OutputSink | None,
    egress: contextlib.AbstractContextManager[None],
) -> tuple[RunOutcome, tuple[Artifact, ...], tuple[SkippedArtifact, ...]]:
    """Blocking: run (with the execution's egress attached to its sandbox's proxy port), then
    collect artifacts from the still-live sandbox if the program finished."""
    with egress:
        outcome = sandbox.run(request, limits, on_output)
    artifacts: tuple[Artifact, ...] = ()
    skipped: tuple[SkippedArtifact, ...] = ()
    if outcome.report is not None:
        try:
            workspace = sandbox.open_workspace()
        except (OSError, ExecboxError) as exc:
            log.warning("cannot open the workspace of sandbox %s: %s", sandbox.id, exc)
        else:
            try:
                artifacts, skipped = collect_artifacts_report(workspace)
            finally:
                os.close(workspace)
    return outcome, artifacts, skipped
