"""Running one execution for an HTTP request: the disconnect watch, the answer.

Shared by the ``/run`` and ``/v1/execute*`` routers (and the sessions router's answer).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from fastapi import Request, Response

from execbox.api.deps import validation_error
from execbox.errors import BadRequestError
from execbox.isolation.base import OutputSink
from execbox.models import ExecutionRequest, ExecutionResult
from execbox.service.executor import Executor
from execbox.wire import dumps, result_to_json

__all__ = ["answer", "execute", "execute_while_connected", "gone"]

log = logging.getLogger("execbox.api")
#: how often a waiting request checks that its client is still connected
_DISCONNECT_POLL_S = 0.25


def answer(result: ExecutionResult, *, native: bool) -> Response:
    """The answer, serialised once by execbox.wire, which cannot fail on what a program
    returned (response_model still documents it in OpenAPI)."""
    return Response(dumps(result_to_json(result, native=native)), media_type="application/json")


def gone() -> Response:
    """For a client that is no longer there (nothing reads it; 499 as nginx logs it)."""
    return Response(status_code=499)


async def execute(executor: Executor, request: ExecutionRequest, on_output: OutputSink | None = None) -> ExecutionResult:
    """One execution (counted in the metrics by the executor); a BadRequestError is a 422 on ``body``."""
    try:
        return await executor.execute(request, on_output)
    except BadRequestError as exc:
        raise validation_error(("body",), str(exc)) from exc


async def execute_while_connected(client: Request, executor: Executor, request: ExecutionRequest) -> ExecutionResult | None:
    """Run ``request`` while ``client`` is connected; None once it went away (a closed
    connection, RAGFlow's own request timeout): the program is stopped and its sandbox
    freed at once, instead of running to its time limit for nobody."""
    task = asyncio.ensure_future(execute(executor, request))
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=_DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await client.is_disconnected():
                log.info("client went away: stopping its %s execution", request.language.value)
                return None
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
