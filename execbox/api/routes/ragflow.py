"""RAGFlow's executor-manager contract: ``POST /run``.

Every answer about the request is HTTP 200 (RAGFlow's client raises on any other status):
over a quota the -429 verdict, a full wait queue the pool-busy verdict (-10).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from execbox.api.body import StrictJSONRoute
from execbox.api.deps import RunAdmissionDep, RunRequestDep
from execbox.api.running import answer, execute_while_connected, gone
from execbox.api.schemas import RunResponse
from execbox.errors import QueueFullError
from execbox.service.executor import Executor, busy_result

__all__ = ["router"]

router = APIRouter(tags=["RAGFlow"], route_class=StrictJSONRoute)


@router.post("/run", response_model=RunResponse, summary="Run code (RAGFlow's contract)")
async def run(execution: RunRequestDep, _admitted: RunAdmissionDep, request: Request) -> Any:
    executor: Executor = request.app.state.executor  # not a dependency: one fewer to solve per request
    try:
        result = await execute_while_connected(request, executor, execution)
    except QueueFullError:
        return answer(busy_result(), native=False)
    return gone() if result is None else answer(result, native=False)
