"""Operations: health (``/``, ``/healthz``), liveness (``/livez``), ``/v1/info``, ``/metrics``.

None of these is rate limited. ``/healthz`` is readiness: 200 once code can run, 503
while a pool cannot build sandboxes. ``/livez`` is liveness: the process answers,
whatever the pools do.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from execbox.api.body import StrictJSONRoute
from execbox.api.deps import ExecutorDep, SettingsDep

__all__ = ["router"]

router = APIRouter(tags=["operations"], route_class=StrictJSONRoute)


async def _health(executor: ExecutorDep) -> JSONResponse:
    stats = executor.pool_stats()
    serving = bool(stats) and all(s.ready > 0 or s.created_total > 0 or s.size == 0 for s in stats)
    body: dict[str, Any] = {
        "status": "ok" if serving else "starting",
        "backend": executor.backend_name,
        "isolation": executor.backend_info,
        "warnings": executor.warnings,
        "pools": [s.__dict__ for s in stats],
    }
    return JSONResponse(body, status_code=200 if serving else 503)


async def _live() -> dict[str, str]:
    return {"status": "ok"}


for _path, _endpoint, _summary in (
    ("/", _health, "Health (RAGFlow)"),
    ("/healthz", _health, "Readiness: ok once code can run"),
    ("/livez", _live, "Liveness: the process answers (whatever the pools do)"),
):
    router.get(_path, summary=_summary, description="`HEAD` answers the same status, without a body.")(_endpoint)
    router.head(_path, include_in_schema=False)(_endpoint)  # the same status; Starlette sends no body


@router.get("/v1/info", summary="Backend, runtimes, limits and pool state")
async def info(settings: SettingsDep, executor: ExecutorDep) -> dict[str, Any]:
    return {
        "backend": executor.backend_name,
        "isolation": executor.backend_info,
        "warnings": executor.warnings,
        "limits": settings.default_limits().model_dump(),
        "code_check": settings.code_check.value,
        "network": bool(settings.egress_rules),
        "egress": [str(rule) for rule in settings.egress_rules],
        "pools": [s.__dict__ for s in executor.pool_stats()],
    }


@router.get("/metrics", summary="Prometheus metrics")
async def prometheus(executor: ExecutorDep) -> Response:
    return Response(generate_latest(executor.metrics.registry), media_type=CONTENT_TYPE_LATEST)
