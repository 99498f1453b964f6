"""RAGFlow's executor-manager contract: ``POST /run``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from execbox.api.body import StrictJSONRoute
from execbox.api.deps import ExecutorDep, MetricsDep, RunRequestDep
from execbox.api.running import answer, execute_while_connected, gone
from execbox.api.schemas import RunResponse

__all__ = ["router"]

router = APIRouter(tags=["RAGFlow"], route_class=StrictJSONRoute)


@router.post("/run", response_model=RunResponse, summary="Run code (RAGFlow's contract)")
async def run(execution: RunRequestDep, request: Request, executor: ExecutorDep, metrics: MetricsDep) -> Any:
    result = await execute_while_connected(request, executor, metrics, execution)
    return gone() if result is None else answer(result, native=False)
