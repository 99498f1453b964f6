"""Typed FastAPI dependencies of the routers: settings, executor, session manager, the
caller, the rate limit and the execution request built from a validated body.

Each router takes what it needs from here (``SettingsDep``, ``ExecutorDep`` ...), so a
route holds no state and no logic of its own; ``create_app`` puts the objects on
``app.state``. :func:`get_caller` is the one place that says who is calling (today: no
one, ``None`` = anonymous).

The execution-request dependencies (:func:`run_request`, :func:`native_request`) declare
the body themselves, so FastAPI validates it before they run; they then apply, in this
order, the rate limit (429), the code size (413) and the limits against the server's
maxima (422), all before an answer (or a stream) starts.
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.exceptions import RequestValidationError

from execbox.api.metrics import Metrics
from execbox.api.ratelimit import RateLimiter
from execbox.api.schemas import ExecuteRequest, LimitsIn, RunRequest
from execbox.errors import BadRequestError, LimitExceededError
from execbox.models import ExecutionRequest, Limits
from execbox.service.executor import Executor
from execbox.service.sessions import SessionManager
from execbox.settings import Settings

__all__ = [
    "Caller",
    "CallerDep",
    "ExecutorDep",
    "MetricsDep",
    "NativeRequestDep",
    "RateGate",
    "RateGateDep",
    "RateLimitedError",
    "RunRequestDep",
    "SessionsDep",
    "SettingsDep",
    "check_code_size",
    "get_caller",
    "get_executor",
    "get_metrics",
    "get_rate_gate",
    "get_sessions",
    "get_settings",
    "merged_limits",
    "native_request",
    "owner_of",
    "retry_after_header",
    "run_request",
    "validation_error",
]

RATE_LIMITED_MESSAGE = "Too many requests, please try again later"


@dataclass(frozen=True)
class Caller:
    """Who is calling: the name of an API key (never the key itself)."""

    name: str


class RateLimitedError(LimitExceededError):
    """Over ``SANDBOX_RATE_LIMIT``: answered 429 with the /run fields (see app.py)."""


class RateGate:
    """The rate limit of the endpoints that run code (per client address today)."""

    def __init__(self, limiter: RateLimiter | None) -> None:
        self.limiter = limiter

    def check(self, request: Request, caller: Caller | None) -> None:
        """RateLimitedError when this client spent its budget."""
        if self.limiter is None:
            return
        client = request.client.host if request.client else "unknown"
        wait_s = self.limiter.acquire(client)
        if wait_s is not None:
            raise RateLimitedError(RATE_LIMITED_MESSAGE, retry_after_s=wait_s)


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_executor(request: Request) -> Executor:
    executor: Executor = request.app.state.executor
    return executor


def get_sessions(request: Request) -> SessionManager:
    sessions: SessionManager | None = request.app.state.sessions
    if sessions is None:
        raise HTTPException(501, "sessions are not available in this build")
    return sessions


def get_metrics(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


def get_rate_gate(request: Request) -> RateGate:
    gate: RateGate = request.app.state.rate_gate
    return gate


async def get_caller(request: Request) -> Caller | None:
    """The caller of this request; None = anonymous (API keys are off)."""
    return None


SettingsDep = Annotated[Settings, Depends(get_settings)]
ExecutorDep = Annotated[Executor, Depends(get_executor)]
SessionsDep = Annotated[SessionManager, Depends(get_sessions)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
RateGateDep = Annotated[RateGate, Depends(get_rate_gate)]
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


async def run_request(
    body: RunRequest, request: Request, settings: SettingsDep, gate: RateGateDep, caller: CallerDep
) -> ExecutionRequest:
    """The execution a valid ``/run`` body asks for."""
    gate.check(request, caller)
    code = body.code
    check_code_size(settings, code)
    return ExecutionRequest(language=body.language, code=code, arguments=body.arguments)


async def native_request(
    body: ExecuteRequest, request: Request, settings: SettingsDep, executor: ExecutorDep, gate: RateGateDep,
    caller: CallerDep,
) -> ExecutionRequest:
    """The execution a valid ``/v1/execute`` body asks for."""
    gate.check(request, caller)
    check_code_size(settings, body.code)
    return ExecutionRequest(
        language=body.language,
        code=body.code,
        arguments=body.arguments,
        stdin=body.stdin,
        files={name: base64.b64decode(data) for name, data in body.files.items()},
        env=body.env,
        limits=merged_limits(settings, executor, body.limits),
    )


RunRequestDep = Annotated[ExecutionRequest, Depends(run_request)]
NativeRequestDep = Annotated[ExecutionRequest, Depends(native_request)]


def retry_after_header(retry_after_s: float) -> dict[str, str]:
    """``Retry-After`` in whole seconds, at least 1."""
    return {"Retry-After": str(max(1, math.ceil(retry_after_s)))}
