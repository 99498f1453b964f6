"""The native execution API: ``POST /v1/execute`` and its streaming twin.

``/v1/execute/stream`` is a FastAPI server-sent-events endpoint (``fastapi.sse``): the
request is validated in full by its dependencies before the first event, the events are
the program's ``stdout``/``stderr`` as it prints, then one ``result``. When the client goes
away mid-stream, FastAPI cancels the generator and the run is stopped with it.

The caller's quotas are held until the answer is sent (the end of the stream). A full wait
queue is 503 with ``Retry-After`` on ``/v1/execute``; on the stream, whose 200 is already
on its way when the run asks for a sandbox, it is a ``result`` event with the pool-busy
verdict (-10).
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from anyio import CancelScope
from fastapi import APIRouter, Request
from fastapi.sse import EventSourceResponse, ServerSentEvent

from execbox.api.body import StrictJSONRoute
from execbox.api.deps import ExecutorDep, NativeAdmissionDep, NativeRequestDep, StreamAdmissionDep
from execbox.api.running import answer, execute, execute_while_connected, gone
from execbox.api.schemas import ExecuteResponse
from execbox.errors import QueueFullError
from execbox.models import ExecutionResult
from execbox.service.executor import Executor, busy_result
from execbox.wire import dumps, result_to_json

__all__ = ["router"]

router = APIRouter(tags=["execute"], route_class=StrictJSONRoute)
_STREAMS = ("stdout", "stderr")


@router.post("/v1/execute", response_model=ExecuteResponse, summary="Run code with per-request limits and inputs")
async def execute_v1(execution: NativeRequestDep, _admitted: NativeAdmissionDep, request: Request) -> Any:
    executor: Executor = request.app.state.executor  # not a dependency: one fewer to solve per request
    result = await execute_while_connected(request, executor, execution)
    return gone() if result is None else answer(result, native=True)


@router.post(
    "/v1/execute/stream",
    summary="Like /v1/execute, streaming the output as server-sent events",
    description=(
        "Events: `stdout` and `stderr` (data: a JSON string, the text as it is printed), "
        "then one `result` (data: the /v1/execute answer, which also holds the whole output)."
    ),
    response_class=EventSourceResponse,
)
async def execute_stream(
    execution: NativeRequestDep, _admitted: StreamAdmissionDep, executor: ExecutorDep
) -> AsyncIterator[ServerSentEvent]:
    loop = asyncio.get_running_loop()
    chunks: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
    decoders = {name: codecs.getincrementaldecoder("utf-8")("replace") for name in _STREAMS}

    def on_output(stream: str, data: bytes) -> None:  # a worker thread
        text = decoders[stream].decode(data)
        if text:
            loop.call_soon_threadsafe(chunks.put_nowait, (stream, text))

    run = asyncio.ensure_future(execute(executor, execution, on_output))
    try:
        while True:
            getter = asyncio.ensure_future(chunks.get())
            try:
                await asyncio.wait({getter, run}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not getter.done():
                    getter.cancel()
            if getter.done() and not getter.cancelled():
                stream, text = getter.result()
                yield ServerSentEvent(event=stream, data=text)
                continue
            await asyncio.sleep(0)  # let the last call_soon_threadsafe callbacks land
            while not chunks.empty():
                stream, text = chunks.get_nowait()
                yield ServerSentEvent(event=stream, data=text)
            try:
                result = run.result()
            except QueueFullError:
                result = busy_result()
            yield ServerSentEvent(event="result", raw_data=_result_data(result))
            return
    finally:  # the client went away mid-stream: stop the program, free its sandbox
        if not run.done():
            run.cancel()
            with CancelScope(shield=True), contextlib.suppress(asyncio.CancelledError):
                await run


def _result_data(result: ExecutionResult) -> str:
    return dumps(result_to_json(result, native=True))
