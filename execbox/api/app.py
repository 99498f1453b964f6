"""The HTTP service: RAGFlow's ``/run`` contract on port 9385, the native ``/v1`` API,
sessions, health and metrics.

``create_app`` builds the app: the objects the routers depend on (``app.state``, read by
:mod:`execbox.api.deps`), the lifespan that starts and closes them, the body limits, the
error handlers, and the routers of :mod:`execbox.api.routes`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from execbox.api.auth import KeyAuth, caller_name
from execbox.api.body import BodyTimeout, StrictJSONRoute
from execbox.api.deps import RateLimitedError, RunRefusal, retry_after_header
from execbox.api.logs import RequestID
from execbox.api.mcp import MCP_PATH, build_mcp, mcp_http_app
from execbox.api.metrics import HTTPMetrics, Metrics
from execbox.api.replicas import ReplicaForwarder, forwarder_options
from execbox.api.routes import execute as execute_routes
from execbox.api.routes import ops as ops_routes
from execbox.api.routes import ragflow as ragflow_routes
from execbox.api.routes import sessions as sessions_routes
from execbox.api.routes.docs import install_docs
from execbox.api.schemas import RunResponse
from execbox.errors import (
    BadRequestError,
    LimitExceededError,
    NotFoundError,
    PackageInstallError,
    QueueFullError,
    UnavailableError,
)
from execbox.service.apikeys import KeyStore
from execbox.service.executor import Executor
from execbox.service.quotas import Quotas
from execbox.service.sessions import SessionManager
from execbox.settings import Settings
from execbox.wire import EXIT_RATE_LIMITED, dumps, result_to_json

__all__ = ["create_app"]

log = logging.getLogger("execbox.api")


def create_app(settings: Settings, executor: Executor | None = None, sessions: SessionManager | None = None) -> FastAPI:
    """The ASGI app; it starts (and on shutdown closes) its Executor, SessionManager and
    Quotas in its lifespan. ConfigurationError for a malformed keys setting or file."""
    engine = executor or Executor(settings)
    manager = sessions if sessions is not None else SessionManager(settings, engine)
    keys = KeyStore.from_settings(settings)
    quotas = Quotas.from_settings(settings)
    # /mcp, over the same executor and quotas; its sessions belong to the key KeyAuth let the call in with
    mcp_http = mcp_http_app(build_mcp(settings, engine, manager, owner_of=caller_name, quotas=quotas), settings)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        for warning in engine.warnings:
            log.warning("%s", warning)
        await quotas.start()
        await manager.start()
        log.info("execbox serving with the %s backend", engine.backend_name)
        try:
            async with mcp_http.lifespan():
                yield
        finally:
            log.info("execbox shutting down: destroying every sandbox")
            try:
                await manager.close()
            finally:
                try:
                    await engine.close()
                finally:
                    await quotas.close()

    app = FastAPI(
        title="execbox",
        version="0.1.0",
        summary="Runs untrusted Python and Node.js code in fresh, isolated sandboxes.",
        lifespan=lifespan,
        docs_url=None,  # served from local assets by install_docs, not from a CDN
        redoc_url=None,
        max_body_size=settings.max_body_size,  # 413 above it, chunked or not
    )
    app.state.settings = settings
    app.state.executor = engine
    app.state.sessions = manager
    app.state.metrics = metrics = Metrics.of(engine.metrics.registry)  # beside the executor's series
    app.state.quotas = quotas
    app.router.route_class = StrictJSONRoute  # and every router's (routes/*)
    app.add_middleware(BodyTimeout, timeout_s=settings.body_timeout)
    if keys is not None:  # a request without a key is refused before its body is read
        app.add_middleware(KeyAuth, keys=keys, run_without_key=settings.run_without_key,
                           on_refused=metrics.unauthenticated.inc)
        log.info("API keys on: %d key(s)%s", len(keys.names()),
                 ", /run open without a key" if settings.run_without_key else "")
    app.add_middleware(HTTPMetrics, metrics=metrics)  # it sees every answer served here, 401s too
    app.add_middleware(RequestID)  # every line logged for a request served here carries its id
    engine.metrics.read_sessions(manager.count)
    # outermost: a call for another replica's session goes there before anything here
    app.add_middleware(ReplicaForwarder, **forwarder_options(settings))
    _add_error_handlers(app)
    for module in (ops_routes, ragflow_routes, execute_routes, sessions_routes):
        app.include_router(module.router)
    app.router.add_route(MCP_PATH, mcp_http.asgi, include_in_schema=False)
    install_docs(app)
    return app


def _add_error_handlers(app: FastAPI) -> None:
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

    @app.exception_handler(RateLimitedError)
    async def _rate_limited(_: Request, exc: RateLimitedError) -> JSONResponse:
        body = RunResponse(status="program_runner_error", exit_code=EXIT_RATE_LIMITED, detail=str(exc), stderr=str(exc))
        return JSONResponse(body.model_dump(mode="json"), status_code=429, headers=retry_after_header(exc.retry_after_s))

    @app.exception_handler(LimitExceededError)
    async def _limit(_: Request, exc: LimitExceededError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=429, headers=retry_after_header(exc.retry_after_s))

    @app.exception_handler(RunRefusal)
    async def _run_refused(_: Request, exc: RunRefusal) -> Response:
        return Response(dumps(result_to_json(exc.result, native=False)), media_type="application/json")

    @app.exception_handler(QueueFullError)
    @app.exception_handler(UnavailableError)
    async def _unavailable(_: Request, exc: QueueFullError | UnavailableError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=503, headers=retry_after_header(exc.retry_after_s))

    @app.exception_handler(NotFoundError)
    async def _not_found(_: Request, exc: NotFoundError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(BadRequestError)
    async def _bad_request(_: Request, exc: BadRequestError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=400)

    @app.exception_handler(PackageInstallError)  # a session's packages (an execution's are a verdict)
    async def _install_failed(_: Request, exc: PackageInstallError) -> JSONResponse:
        return JSONResponse({"detail": f"installing the packages failed: {exc}"}, status_code=502)
