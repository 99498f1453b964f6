"""Typed FastAPI dependencies of the routers: settings, executor, session manager, the
caller, the quotas and the execution request built from a validated body.

Each router takes what it needs from here (``SettingsDep``, ``ExecutorDep`` ...), so a
route holds no state and no logic of its own; ``create_app`` puts the objects on
``app.state``. :func:`get_caller` is the one place that says who is calling: the name of
the API key that :class:`execbox.api.auth.KeyAuth` let in (None = anonymous: keys off,
or ``/run`` without a key under ``SANDBOX_RUN_WITHOUT_KEY``).

The execution-request dependencies (:func:`run_request`, :func:`native_request`) declare
the body themselves, so FastAPI validates it before they run; they then apply, in this
order, the rate per client address (429), the code size (413) and the limits against the
server's maxima (422), all before an answer (or a stream) starts. The admission
dependencies (:data:`AdmissionDep`, :data:`RunAdmissionDep`, :data:`NativeAdmissionDep`)
come after them: the caller's concurrency slot and rate (:class:`~execbox.service.quotas.Quotas`),
held until the answer is sent, the end of a stream included.

On ``/run`` a refusal is RAGFlow's answer, HTTP 200 with the verdict (:class:`RunRefusal`:
-429 over a quota, -3 when the quota store does not answer), because RAGFlow's client
raises on any other status; on ``/v1/execute*`` it is 429 with ``Retry-After`` and the
same fields (:class:`RateLimitedError`); elsewhere 429 (or 503) with ``{"detail"}``.
"""

from __future__ import annotations

import base64
import contextlib
import math
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.exceptions import RequestValidationError

from execbox.api.auth import caller_name
from execbox.api.metrics import Metrics
from execbox.api.schemas import ExecuteRequest, LimitsIn, RunRequest
from execbox.errors import BadRequestError, LimitExceededError, UnavailableError
from execbox.models import ExecutionRequest, ExecutionResult, Limits
from execbox.service.classify import EXIT_INTERNAL, runner_error
from execbox.service.executor import Executor
from execbox.service.quotas import Quotas
from execbox.service.sessions import SessionManager
from execbox.settings import Settings
from execbox.wire import EXIT_RATE_LIMITED

__all__ = [
    "AdmissionDep",
    "Caller",
    "CallerDep",
    "ExecutorDep",
    "MetricsDep",
    "NativeAdmissionDep",
    "NativeRequestDep",
    "QuotasDep",
    "RateLimitedError",
    "RunAdmissionDep",
    "StreamAdmissionDep",
    "RunRefusal",
    "RunRequestDep",
    "SessionsDep",
    "SettingsDep",
    "admission",
    "check_code_size",
    "checked_packages",
    "get_caller",
    "get_executor",
    "get_metrics",
    "get_quotas",
    "get_sessions",
    "get_settings",
    "merged_limits",
    "native_admission",
    "native_request",
    "owner_of",
    "rate_limited_result",
    "retry_after_header",
    "run_admission",
    "run_request",
    "validation_error",
]

RATE_LIMITED_MESSAGE = "Too many requests, please try again later"


@dataclass(frozen=True)
class Caller:
    """Who is calling: the name of an API key (never the key itself)."""

    name: str


class RateLimitedError(LimitExceededError):
    """Over a rate or a quota on ``/v1/execute*``: answered 429 with ``Retry-After`` and the
    /run fields, exit code -429 (see app.py)."""


class RunRefusal(Exception):
    """``/run`` refused a request before it ran: answered HTTP 200 with ``result``."""

    def __init__(self, result: ExecutionResult) -> None:
        super().__init__(result.detail)
        self.result = result


def rate_limited_result() -> ExecutionResult:
    """RAGFlow's answer to a request over a rate or a quota."""
    return runner_error(EXIT_RATE_LIMITED, RATE_LIMITED_MESSAGE, RATE_LIMITED_MESSAGE)


def _refused_on_run(exc: Exception) -> Exception:
    if isinstance(exc, LimitExceededError):
        return RunRefusal(rate_limited_result())
    return RunRefusal(runner_error(EXIT_INTERNAL, "internal_error", f"{exc}\n"))


def _raise(answer: Exception, cause: Exception) -> None:
    if answer is cause:
        raise cause
    raise answer from cause


def _refused_on_v1(exc: Exception) -> Exception:
    if isinstance(exc, LimitExceededError):
        return RateLimitedError(f"{RATE_LIMITED_MESSAGE}: {exc}", exc.retry_after_s, exc.quota)
    return exc


async def get_settings(request: Request) -> Settings:
    """(``async``, as every dependency here: FastAPI runs a plain ``def`` dependency in a
    worker thread, a thread hop per dependency per request.)"""
    settings: Settings = request.app.state.settings
    return settings


async def get_executor(request: Request) -> Executor:
    executor: Executor = request.app.state.executor
    return executor


async def get_sessions(request: Request) -> SessionManager:
    sessions: SessionManager = request.app.state.sessions
    return sessions


async def get_metrics(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


async def get_quotas(request: Request) -> Quotas:
    quotas: Quotas = request.app.state.quotas
    return quotas


async def get_caller(request: Request) -> Caller | None:
    """The caller of this request: the key's name; None = anonymous (keys off, or /run
    without a key under SANDBOX_RUN_WITHOUT_KEY)."""
    return _caller_of(request)


SettingsDep = Annotated[Settings, Depends(get_settings)]
ExecutorDep = Annotated[Executor, Depends(get_executor)]
SessionsDep = Annotated[SessionManager, Depends(get_sessions)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
QuotasDep = Annotated[Quotas, Depends(get_quotas)]
CallerDep = Annotated[Caller | None, Depends(get_caller)]


def owner_of(caller: Caller | None) -> str | None:
    """The owner a session is kept under: the caller's key name, None when anonymous."""
    return caller.name if caller is not None else None


def validation_error(loc: tuple[str | int, ...], message: str, kind: str = "value_error") -> RequestValidationError:
    """A 422 in the shape of every other one (``detail`` a list, ``loc`` naming the field)."""
    return RequestValidationError([{"loc": loc, "msg": message, "type": kind}])


def check_code_size(settings: Settings, code: str) -> None:
    if len(code.encode()) > settings.max_code_size:
        raise HTTPException(413, f"code larger than SANDBOX_MAX_CODE_SIZE ({settings.max_code_size} bytes)")


def merged_limits(settings: Settings, executor: Executor, given: LimitsIn | None) -> Limits | None:
    """The request's limits over the server's defaults; a 422 naming ``limits`` above a maximum."""
    if given is None:
        return None
    limits = Limits(**{**settings.default_limits().model_dump(), **given.model_dump(exclude_none=True)})
    try:
        executor.limits_for(ExecutionRequest(code="", limits=limits))
    except BadRequestError as exc:
        raise validation_error(("body", "limits"), str(exc)) from exc
    return limits


async def _check_address(request: Request, quotas: Quotas, metrics: Metrics, caller: Caller | None,
                         refuse: Callable[[Exception], Exception]) -> None:
    """SANDBOX_RATE_LIMIT, per client address as the service sees it."""
    try:
        await quotas.check_client(request.client.host if request.client else "unknown")
    except (LimitExceededError, UnavailableError) as exc:
        metrics.refused(owner_of(caller), exc)
        _raise(refuse(exc), exc)


def _caller_of(request: Request) -> Caller | None:
    name = caller_name(request)
    return Caller(name) if name else None


async def run_request(body: RunRequest, request: Request) -> ExecutionRequest:
    """The execution a valid ``/run`` body asks for.

    The execution dependencies take what they need from ``request.app.state`` themselves
    rather than as sub-dependencies: FastAPI solves each dependency anew per request (about
    0.15 ms of CPU per /run request for the seven this saves, measured)."""
    state = request.app.state
    settings: Settings = state.settings
    await _check_address(request, state.quotas, state.metrics, _caller_of(request), _refused_on_run)
    code = body.code
    check_code_size(settings, code)
    return ExecutionRequest(language=body.language, code=code, arguments=body.arguments)


async def native_request(body: ExecuteRequest, request: Request) -> ExecutionRequest:
    """The execution a valid ``/v1/execute`` body asks for."""
    state = request.app.state
    settings: Settings = state.settings
    executor: Executor = state.executor
    await _check_address(request, state.quotas, state.metrics, _caller_of(request), _refused_on_v1)
    check_code_size(settings, body.code)
    egress = None if body.egress is None else tuple(body.egress)
    try:
        executor.egress_rules_for(ExecutionRequest(code="", egress=egress))  # a 422 now, not mid-stream
    except BadRequestError as exc:
        raise validation_error(("body", "egress"), str(exc)) from exc
    return ExecutionRequest(
        language=body.language,
        code=body.code,
        arguments=body.arguments,
        stdin=body.stdin,
        files={name: base64.b64decode(data) for name, data in body.files.items()},
        env=body.env,
        limits=merged_limits(settings, executor, body.limits),
        packages=await checked_packages(executor, body),
        egress=egress,
    )


async def checked_packages(executor: Executor, body: ExecuteRequest) -> tuple[str, ...]:
    """The body's packages, canonical and installed: a package malformed, not allowed, missing
    from the index or without a wheel is a 422 naming ``packages`` before anything runs or
    streams (a failure to install is the execution's verdict)."""
    try:
        packages = executor.packages.check(body.language, body.packages)
        if packages:
            await executor.prepare_packages(body.language, packages)
    except BadRequestError as exc:
        raise validation_error(("body", "packages"), str(exc)) from exc
    return packages


RunRequestDep = Annotated[ExecutionRequest, Depends(run_request)]
NativeRequestDep = Annotated[ExecutionRequest, Depends(native_request)]


@contextlib.asynccontextmanager
async def _admitted(quotas: Quotas, metrics: Metrics, caller: Caller | None,
                    refuse: Callable[[Exception], Exception]) -> AsyncIterator[None]:
    async with contextlib.AsyncExitStack() as stack:
        try:
            await stack.enter_async_context(quotas.admit(owner_of(caller)))
        except (LimitExceededError, UnavailableError) as exc:
            metrics.refused(owner_of(caller), exc)
            _raise(refuse(exc), exc)
        yield


async def admission(quotas: QuotasDep, metrics: MetricsDep, caller: CallerDep) -> AsyncIterator[None]:
    """The caller's quotas (a concurrency slot, a unit of rate), held while the request runs;
    LimitExceededError (429) or UnavailableError (503) when refused."""
    async with _admitted(quotas, metrics, caller, lambda exc: exc):
        yield


async def run_admission(request: Request) -> AsyncIterator[None]:
    """:func:`admission` for ``/run``: a refusal is RAGFlow's answer (RunRefusal)."""
    async with _admitted(request.app.state.quotas, request.app.state.metrics, _caller_of(request), _refused_on_run):
        yield


async def native_admission(request: Request) -> AsyncIterator[None]:
    """:func:`admission` for ``/v1/execute*``: over a quota is RateLimitedError."""
    async with _admitted(request.app.state.quotas, request.app.state.metrics, _caller_of(request), _refused_on_v1):
        yield


# A slot is given back when the path operation ends, *before* its answer is sent, so that a
# caller that has its answer may send the next request at once (to this replica or
# another); a stream's runs while its answer is sent: it holds its slot until the end.
AdmissionDep = Annotated[None, Depends(admission, scope="function")]
RunAdmissionDep = Annotated[None, Depends(run_admission, scope="function")]
NativeAdmissionDep = Annotated[None, Depends(native_admission, scope="function")]
StreamAdmissionDep = Annotated[None, Depends(native_admission, scope="request")]


def retry_after_header(retry_after_s: float) -> dict[str, str]:
    """``Retry-After`` in whole seconds, at least 1."""
    return {"Retry-After": str(max(1, math.ceil(retry_after_s)))}
