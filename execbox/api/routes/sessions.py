"""Sessions: ``/v1/sessions*``, one sandbox kept for one caller across calls.

HTTP mapping only; the state lives in :class:`execbox.service.sessions.SessionManager`.
Its errors are answered by the handlers of ``create_app``: NotFoundError 404,
BadRequestError 400, LimitExceededError 429 with ``Retry-After``. File contents travel
as raw bytes (the request body of ``PUT``, ``application/octet-stream`` on ``GET``),
within ``SANDBOX_MAX_BODY_SIZE``.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from execbox.api.body import StrictJSONRoute
from execbox.api.deps import (
    AdmissionDep,
    CallerDep,
    ExecutorDep,
    SessionsDep,
    SettingsDep,
    check_code_size,
    merged_limits,
    owner_of,
)
from execbox.api.running import answer
from execbox.api.schemas import (
    CellIn,
    ExecuteResponse,
    SessionCreatedOut,
    SessionCreateIn,
    SessionFileOut,
    SessionFilesOut,
    SessionListOut,
    SessionOut,
)

__all__ = ["router"]

router = APIRouter(prefix="/v1/sessions", tags=["sessions"], route_class=StrictJSONRoute)
_FILE_BODY = {"content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}


@router.post("", status_code=201, response_model=SessionCreatedOut, summary="Start a session")
async def create_session(
    body: SessionCreateIn, _admitted: AdmissionDep, settings: SettingsDep, executor: ExecutorDep,
    sessions: SessionsDep, caller: CallerDep,
) -> SessionCreatedOut:
    request = body.to_request(merged_limits(settings, executor, body.limits))
    return SessionCreatedOut.from_info(await sessions.create(request, owner_of(caller)))


@router.get("", response_model=SessionListOut, summary="The live sessions (the caller's own)")
async def list_sessions(sessions: SessionsDep, caller: CallerDep) -> SessionListOut:
    return SessionListOut(sessions=[SessionOut.from_info(info) for info in sessions.list(owner_of(caller))])


@router.get("/{session_id}", response_model=SessionOut, summary="Describe a session")
async def describe_session(session_id: str, sessions: SessionsDep, caller: CallerDep) -> SessionOut:
    return SessionOut.from_info(sessions.describe(session_id, owner_of(caller)))


@router.delete("/{session_id}", status_code=204, summary="End a session: its sandbox is destroyed")
async def delete_session(session_id: str, sessions: SessionsDep, caller: CallerDep) -> Response:
    await sessions.delete(session_id, owner_of(caller))
    return Response(status_code=204)


@router.post(
    "/{session_id}/execute", response_model=ExecuteResponse, summary="Run a cell in the session's interpreter"
)
async def execute_cell(
    session_id: str, body: CellIn, _admitted: AdmissionDep, settings: SettingsDep, sessions: SessionsDep,
    caller: CallerDep,
) -> Any:
    check_code_size(settings, body.code)
    result = await sessions.execute(session_id, body.to_request(), owner_of(caller))
    return answer(result, native=True)


@router.get("/{session_id}/files", response_model=SessionFilesOut, summary="The files of the session's workspace")
async def list_files(session_id: str, sessions: SessionsDep, caller: CallerDep) -> SessionFilesOut:
    files = await sessions.list_files(session_id, owner_of(caller))
    return SessionFilesOut(files=[SessionFileOut.from_file(f) for f in files])


@router.put(
    "/{session_id}/files/{path:path}", status_code=201, response_model=SessionFileOut,
    summary="Write a file into the session's workspace (the body is its content)", openapi_extra={"requestBody": _FILE_BODY},
)
async def put_file(session_id: str, path: str, request: Request, sessions: SessionsDep, caller: CallerDep) -> SessionFileOut:
    data = await request.body()
    return SessionFileOut.from_file(await sessions.put_file(session_id, path, data, owner_of(caller)))


@router.get(
    "/{session_id}/files/{path:path}", response_class=Response, summary="Read a file of the session's workspace",
    responses={200: _FILE_BODY},
)
async def get_file(session_id: str, path: str, sessions: SessionsDep, caller: CallerDep) -> Response:
    data = await sessions.get_file(session_id, path, owner_of(caller))
    return Response(data, media_type="application/octet-stream")
