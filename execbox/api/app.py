"""The HTTP service: RAGFlow's ``/run`` contract on port 9385, plus ``/v1`` and ``/metrics``."""

from __future__ import annotations

import asyncio
import base64
import codecs
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.exceptions import HTTPException as StarletteHTTPException

from execbox.api.body import BodyTimeout, StrictJSONRoute
from execbox.api.ratelimit import RateLimiter
from execbox.api.schemas import ExecuteRequest, ExecuteResponse, RunRequest, RunResponse
from execbox.errors import BadRequestError
from execbox.isolation.base import OutputSink
from execbox.models import ExecutionRequest, ExecutionResult, Limits
from execbox.service.executor import Executor
from execbox.settings import Settings
from execbox.wire import EXIT_RATE_LIMITED, dumps, result_to_json

__all__ = ["create_app"]

log = logging.getLogger("execbox.api")
#: how often a waiting request checks that its client is still connected
_DISCONNECT_POLL_S = 0.25
RATE_LIMITED_MESSAGE = "Too many requests, please try again later"


class _Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.executions = Counter(
            "execbox_executions_total", "Executions by language and verdict", ["language", "status"], registry=self.registry
        )
        self.duration = Histogram(
            "execbox_execution_seconds", "Time from request to verdict", ["language"], registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.ready = Gauge("execbox_pool_ready", "Ready sandboxes", ["pool"], registry=self.registry)
        self.leased = Gauge("execbox_pool_leased", "Sandboxes running code", ["pool"], registry=self.registry)


def _json(result: ExecutionResult, *, native: bool) -> Response:
    """The answer, serialised once by execbox.wire, which cannot fail on what a program
    returned (response_model still documents it in OpenAPI)."""
    return Response(dumps(result_to_json(result, native=native)), media_type="application/json")


def _error(loc: tuple[str | int, ...], message: str, kind: str = "value_error") -> RequestValidationError:
    """A 422 in the shape of every other one (``detail`` a list, ``loc`` naming the field)."""
    return RequestValidationError([{"loc": loc, "msg": message, "type": kind}])


def _gone() -> Response:
    """For a client that is no longer there (nothing reads it; 499 as nginx logs it)."""
    return Response(status_code=499)


def create_app(settings: Settings, executor: Executor | None = None) -> FastAPI:
    """The ASGI app; it starts (and on shutdown closes) its Executor in its lifespan."""
    engine = executor or Executor(settings)
    metrics = _Metrics()
    limiter = RateLimiter(*settings.rate) if settings.rate else None

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        for warning in engine.warnings:
            log.warning("%s", warning)
        log.info("execbox serving with the %s backend", engine.backend_name)
        try:
            yield
        finally:
            log.info("execbox shutting down: destroying every sandbox")
            await engine.close()

    app = FastAPI(
        title="execbox",
        version="0.1.0",
        summary="Runs untrusted Python and Node.js code in fresh, isolated sandboxes.",
        lifespan=lifespan,
        max_body_size=2 * settings.max_code_size + (1 << 20),  # 413 above it, chunked or not
    )
    app.router.route_class = StrictJSONRoute
    app.add_middleware(BodyTimeout, timeout_s=settings.body_timeout)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        response = await http_exception_handler(request, exc)
        if exc.status_code in (408, 413):  # the rest of the body is not read: do not wait for it
            response.headers["connection"] = "close"
        return response

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = []
        for e in exc.errors():
            message = str(e.get("msg"))
            reason = (e.get("ctx") or {}).get("error")
            if e.get("type") == "json_invalid" and reason:
                message = f"{message}: {reason}"
            errors.append({"loc": list(e.get("loc", ())), "msg": message, "type": e.get("type")})
        return JSONResponse({"detail": errors}, status_code=422)

    def health() -> JSONResponse:
        stats = engine.pool_stats()
        serving = bool(stats) and all(s.ready > 0 or s.created_total > 0 or s.size == 0 for s in stats)
        body: dict[str, Any] = {
            "status": "ok" if serving else "starting",
            "backend": engine.backend_name,
            "isolation": engine.backend_info,
            "warnings": engine.warnings,
            "pools": [s.__dict__ for s in stats],
        }
        return JSONResponse(body, status_code=200 if serving else 503)

    app.get("/", summary="Health (RAGFlow)")(health)
    app.get("/healthz", summary="Health: ok once code can run")(health)

    def check_rate(request: Request) -> JSONResponse | None:
        client = request.client.host if request.client else "unknown"
        if limiter is None or limiter.allow(client):
            return None
        body = RunResponse(
            status="program_runner_error", exit_code=EXIT_RATE_LIMITED, detail=RATE_LIMITED_MESSAGE,
            stderr=RATE_LIMITED_MESSAGE,
        )
        return JSONResponse(body.model_dump(mode="json"), status_code=429)

    def check_code_size(code: str) -> None:
        if len(code.encode()) > settings.max_code_size:
            raise HTTPException(413, f"code larger than SANDBOX_MAX_CODE_SIZE ({settings.max_code_size} bytes)")

    async def execute(request: ExecutionRequest, on_output: OutputSink | None = None) -> ExecutionResult:
        with metrics.duration.labels(request.language.value).time():
            try:
                result = await engine.execute(request, on_output)
            except BadRequestError as exc:
                raise _error(("body",), str(exc)) from exc
        metrics.executions.labels(request.language.value, result.status.value).inc()
        return result

    async def execute_for(client: Request, request: ExecutionRequest) -> ExecutionResult | None:
        """Run ``request`` while ``client`` is connected; None once it went away (a closed
        connection, RAGFlow's own request timeout): the program is stopped and its sandbox
        freed at once, instead of running to its time limit for nobody."""
        task = asyncio.ensure_future(execute(request))
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

    @app.post("/run", response_model=RunResponse, summary="Run code (RAGFlow's contract)")
    async def run(body: RunRequest, request: Request) -> Any:
        if (limited := check_rate(request)) is not None:
            return limited
        code = body.code
        check_code_size(code)
        result = await execute_for(request, ExecutionRequest(language=body.language, code=code, arguments=body.arguments))
        return _gone() if result is None else _json(result, native=False)

    def native_request(body: ExecuteRequest) -> ExecutionRequest:
        check_code_size(body.code)
        limits = None
        if body.limits is not None:
            given = body.limits.model_dump(exclude_none=True)
            limits = Limits(**{**settings.default_limits().model_dump(), **given})
        native = ExecutionRequest(
            language=body.language,
            code=body.code,
            arguments=body.arguments,
            stdin=body.stdin,
            files={name: base64.b64decode(data) for name, data in body.files.items()},
            env=body.env,
            limits=limits,
        )
        try:
            engine.limits_for(native)  # 422 now, not in the middle of a stream
        except BadRequestError as exc:
            raise _error(("body", "limits"), str(exc)) from exc
        return native

    @app.post("/v1/execute", response_model=ExecuteResponse, summary="Run code with per-request limits and inputs")
    async def execute_v1(body: ExecuteRequest, request: Request) -> Any:
        if (limited := check_rate(request)) is not None:
            return limited
        result = await execute_for(request, native_request(body))
        return _gone() if result is None else _json(result, native=True)

    @app.post(
        "/v1/execute/stream",
        summary="Like /v1/execute, streaming the output as server-sent events",
        description=(
            "Events: `stdout` and `stderr` (data: a JSON string, the text as it is printed), "
            "then one `result` (data: the /v1/execute answer, which also holds the whole output)."
        ),
        response_class=StreamingResponse,
    )
    async def execute_stream(body: ExecuteRequest, request: Request) -> Any:
        if (limited := check_rate(request)) is not None:
            return limited
        native = native_request(body)
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        decoders = {name: codecs.getincrementaldecoder("utf-8")("replace") for name in ("stdout", "stderr")}

        def on_output(stream: str, data: bytes) -> None:  # a worker thread
            text = decoders[stream].decode(data)
            if text:
                loop.call_soon_threadsafe(chunks.put_nowait, (stream, text))

        async def events() -> AsyncIterator[str]:
            run = asyncio.ensure_future(execute(native, on_output))
            try:
                async for event in stream(run):
                    yield event
            finally:  # the client went away mid-stream: stop the program, free its sandbox
                if not run.done():
                    run.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await run

        async def stream(run: asyncio.Future[ExecutionResult]) -> AsyncIterator[str]:
            while True:
                getter = asyncio.ensure_future(chunks.get())
                await asyncio.wait({getter, run}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    stream, text = getter.result()
                    yield f"event: {stream}\ndata: {json.dumps(text)}\n\n"
                    continue
                getter.cancel()
                await asyncio.sleep(0)  # let the last call_soon_threadsafe callbacks land
                while not chunks.empty():
                    stream, text = chunks.get_nowait()
                    yield f"event: {stream}\ndata: {json.dumps(text)}\n\n"
                answer = dumps(result_to_json(run.result(), native=True))
                yield f"event: result\ndata: {answer}\n\n"
                return

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/v1/info", summary="Backend, runtimes, limits and pool state")
    async def info() -> dict[str, Any]:
        return {
            "backend": engine.backend_name,
            "isolation": engine.backend_info,
            "warnings": engine.warnings,
            "limits": settings.default_limits().model_dump(),
            "code_check": settings.code_check.value,
            "network": settings.enable_network,
            "pools": [s.__dict__ for s in engine.pool_stats()],
        }

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus() -> Response:
        for stat in engine.pool_stats():
            metrics.ready.labels(stat.name).set(stat.ready)
            metrics.leased.labels(stat.name).set(stat.leased)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
