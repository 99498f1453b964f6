"""The MCP (Model Context Protocol) server: execbox's tools for agent hosts.

Four tools, over the same :class:`~execbox.service.executor.Executor` and
:class:`~execbox.service.sessions.SessionManager` as the HTTP API:

* ``run_code(code, language, arguments)``: a fresh sandbox, as ``/v1/execute``;
* ``create_session(language)``: a sandbox that keeps its interpreter's state;
* ``run_in_session(session_id, code)``: one cell, as ``/v1/sessions/{id}/execute``;
* ``close_session(session_id)``.

A run's answer is text (status, result, stdout, stderr) plus one image content per PNG or
JPEG artifact and one embedded resource per other artifact. A program that failed is a
normal tool result with ``isError: true``, never a protocol error; so is an unknown
session. The tool descriptions are written for the model that calls them: what the
sandbox has (interpreters and packages, read from the runtimes), its limits and network
(read from the settings), and how to get files back (``artifacts/``).

Transports (docs/mcp.md): ``execbox mcp`` serves stdio (:func:`serve_stdio`); the HTTP
service mounts :func:`mcp_http_app`'s ASGI app at ``/mcp`` (MCP's streamable HTTP,
stateless: the session ids of these tools are execbox sessions, not transport state, so
any replica can answer any request) and enters its ``lifespan`` in its own.

Built on the official ``mcp`` SDK (``MCPServer``); nothing of the protocol is hand-written.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import subprocess
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Annotated, Any, Literal
from urllib.parse import quote

import httpx
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.transport_security import TransportSecuritySettings
from mcp_types import (
    BlobResourceContents,
    CallToolResult,
    ContentBlock,
    EmbeddedResource,
    ImageContent,
    TextContent,
    TextResourceContents,
    ToolAnnotations,
)
from pydantic import BaseModel, Field
from starlette.requests import Request
from starlette.types import ASGIApp

from execbox.api.replicas import CONNECT_TIMEOUT_S, FORWARDED_BY_HEADER, foreign_session_url
from execbox.errors import BadRequestError, LimitExceededError, NotFoundError, UnavailableError
from execbox.models import (
    CellRequest,
    ExecutionRequest,
    ExecutionResult,
    Language,
    SessionRequest,
    Status,
)
from execbox.runtimes import RUNTIMES, Runtime, language_names
from execbox.service.executor import Executor
from execbox.service.quotas import Quotas
from execbox.service.sessions import SessionManager
from execbox.settings import CodeCheckMode, Settings
from execbox.wire import result_from_json

__all__ = ["MCP_PATH", "MCPHttpApp", "SessionCreated", "build_mcp", "mcp_http_app", "render_result", "serve_stdio"]

log = logging.getLogger("execbox.mcp")

#: where the HTTP service serves MCP's streamable HTTP transport
MCP_PATH = "/mcp"
#: artifacts an MCP host shows as images; the others are embedded resources
IMAGE_TYPES = frozenset({"image/png", "image/jpeg"})
#: artifact types carried as text in an embedded resource (the rest as base64 blobs)
TEXT_TYPES = frozenset({"text/csv", "application/json", "text/html", "image/svg+xml"})
_PROBE_TIMEOUT_S = 5.0

Code = Annotated[str, Field(description="the program's source code")]
_LANGUAGES = language_names()
#: the tools' language argument: one of the registered runtimes, the first by default
LanguageArg = Annotated[
    Literal[_LANGUAGES],  # type: ignore[valid-type]
    Field(description=f"{_LANGUAGES[0]} (default) or {' or '.join(_LANGUAGES[1:])}"),
]
SessionId = Annotated[str, Field(description="the session_id that create_session returned")]


class SessionCreated(BaseModel):
    """The structured answer of ``create_session``."""

    session_id: str = Field(description="pass it to run_in_session and close_session")


# ---------------------------------------------------------------- what the sandbox has


def _size(size_bytes: int) -> str:
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size_bytes >= factor and size_bytes % factor == 0:
            return f"{size_bytes // factor} {unit}"
    return f"{size_bytes} bytes"


def _packages(runtime: Runtime) -> list[str]:
    """``name version`` of each package of a runtime's environment (requirements.txt, package.json)."""
    try:
        text = runtime.packages_file.read_text()
    except OSError:
        return []
    if runtime.packages_file.suffix == ".json":
        return [f"{name} {version}" for name, version in json.loads(text).get("dependencies", {}).items()]
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return [line.replace("==", " ") for line in lines if line]


def _interpreter_version(runtime: Runtime, settings: Settings) -> str:
    """``3.11`` / ``20``: the built Python environment's version, or what node says (else "")."""
    if runtime.version_file is not None:
        with contextlib.suppress(OSError):
            for line in (runtime.env_dir(settings.runtime_dir) / runtime.version_file).read_text().splitlines():
                key, _, value = line.partition("=")
                if key.strip() == "version":
                    return ".".join(value.strip().split(".")[:2])
        return ""
    try:
        out = subprocess.run([str(runtime.interpreter), "--version"], capture_output=True, text=True,
                             timeout=_PROBE_TIMEOUT_S, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.strip().lstrip("v").split(".")[0]


def _environment(settings: Settings, *, session: bool) -> str:
    """What the run tools share: interpreters, packages, files, network, limits, the check."""
    runtimes = []
    for runtime in RUNTIMES.values():
        version = _interpreter_version(runtime, settings)
        packages = ", ".join(_packages(runtime)) or "no extra packages"
        runtimes.append(f"{runtime.display_name} {version}".strip() + f" with {packages}")
    workspace = (
        "The session's working directory keeps its files from cell to cell"
        if session
        else "Each run starts in an empty, writable working directory"
    )
    network = (
        "Network: HTTP(S) only, through a proxy (HTTP_PROXY/HTTPS_PROXY are set), to "
        + ", ".join(map(str, settings.egress_rules)) + "; nothing else is reachable."
        if settings.egress_rules
        else "Network: none (no network interface but loopback): do not download anything or pip/npm install."
    )
    check = {
        CodeCheckMode.BLOCK: (
            " A static check refuses some code before it runs (status program_runner_error, 'Code is unsafe', "
            "one 'Line N: ...' per finding): imports of os, sys, subprocess, shutil and the like, calls of eval, "
            "exec, open, getattr; Node's fs, child_process, vm. Write files with the libraries' own functions "
            "(plt.savefig, df.to_csv, df.to_json) rather than open()."
        ),
        CodeCheckMode.GUARD: (
            " A static check refuses code that starts processes, loads native code, generates code at run time "
            "(eval, exec) or reaches into the interpreter's internals (status program_runner_error, 'Code is unsafe')."
        ),
    }.get(settings.code_check, "")
    return (
        f"Sandbox: {'; '.join(runtimes)} (matplotlib draws with the Agg backend; Node.js code is CommonJS: use "
        f"require). {workspace} ({_size(settings.max_disk)}); save charts and data files under artifacts/ (for "
        "instance plt.savefig('artifacts/chart.png'), df.to_csv('artifacts/data.csv')) to get them back: PNG and "
        "JPEG come back as images, .svg .pdf .csv .json .html as embedded files; at most 10 files of 10 MiB each. "
        f"{network} Limits of one {'cell' if session else 'run'}: {settings.timeout:g} s wall time, "
        f"{_size(settings.max_memory)} memory, {_size(settings.max_output)} of stdout + stderr, {settings.max_pids} "
        f"processes and threads; over a limit it ends with status resource_limit_exceeded.{check}"
    )


def _descriptions(settings: Settings) -> dict[str, str]:
    return {
        "run_code": (
            "Run a program once in a fresh, isolated sandbox and get back its result, stdout and stderr. "
            "Nothing is kept between calls (for state that lasts, use create_session). The program must define "
            "a function main: Python main(**arguments) (def or async def), Node.js main(arguments) (function or "
            "async function); its return value, which must be JSON-serialisable, is the result. Print freely: "
            f"the output comes back too. {_environment(settings, session=False)} A program that fails (an "
            "exception, a limit, a refused construct) comes back as an error result with its status and stderr: "
            "fix the code and call again."
        ),
        "create_session": (
            "Start a session: one sandboxed interpreter (python or nodejs) that keeps its variables, functions, "
            "imports and files across run_in_session calls, like a notebook. Returns its session_id. A session "
            "ends when closed (call close_session when done), after some idle time, at its maximum lifetime, or "
            "when a cell runs out of memory; then create another."
        ),
        "run_in_session": (
            "Run a cell of code in a session made by create_session. Names defined by earlier cells stay defined "
            "(in Node.js, top-level let, const, var and function declarations persist, and top-level await "
            "works); no main function is needed; the value of the cell's last expression is the result (none when "
            "the cell ends with a statement). Files saved under artifacts/ during the cell come back. A cell over "
            "the time limit is interrupted and the session usually survives; a cell that runs out of memory ends "
            f"the session. {_environment(settings, session=True)}"
        ),
        "close_session": "Close a session made by create_session and free its sandbox (its state and files are gone).",
    }


# ---------------------------------------------------------------- answers


def _result_text(result: ExecutionResult) -> str:
    if result.result is None or not result.result.present:
        return "none"
    if result.result.type == "json":
        return json.dumps(result.result.value, ensure_ascii=False)
    return str(result.result.value)


def render_result(result: ExecutionResult) -> str:
    """The text a model reads: the verdict, the result, the output, the artifacts."""
    verdict = result.status.value
    kind = result.resource_limit_type or result.unauthorized_access_type or result.runtime_error_type
    if kind is not None:
        verdict += f" ({kind.value})"
    facts = [f"exit code {result.exit_code}"]
    if result.detail and result.detail != result.status.value:
        facts.append(f"detail {result.detail}")
    if result.time_used_ms is not None:
        facts.append(f"{result.time_used_ms:.0f} ms")
    lines = [f"status: {verdict}; " + ", ".join(facts), f"result: {_result_text(result)}"]
    for name, text in (("stdout", result.stdout), ("stderr", result.stderr)):
        lines.append(f"{name}:" + (f"\n{text.rstrip(chr(10))}" if text else " (empty)"))
    if result.artifacts:
        listed = ", ".join(f"{a.name} ({a.mime_type}, {a.size} bytes)" for a in result.artifacts)
        lines.append(f"artifacts: {listed}")
    for skipped in result.artifacts_skipped:
        lines.append(f"artifact left out: {skipped.name}: {skipped.reason}")
    return "\n".join(lines)


def _artifact_content(name: str, mime_type: str, content: bytes) -> ContentBlock:
    if mime_type in IMAGE_TYPES:
        return ImageContent(type="image", data=base64.b64encode(content).decode("ascii"), mime_type=mime_type)
    uri = f"execbox://artifacts/{quote(name)}"
    if mime_type in TEXT_TYPES:
        text = content.decode("utf-8", "replace")
        return EmbeddedResource(type="resource", resource=TextResourceContents(uri=uri, mime_type=mime_type, text=text))
    blob = base64.b64encode(content).decode("ascii")
    return EmbeddedResource(type="resource", resource=BlobResourceContents(uri=uri, mime_type=mime_type, blob=blob))


def tool_result(result: ExecutionResult) -> CallToolResult:
    """A run as a tool result: ``isError`` unless the program succeeded."""
    content: list[ContentBlock] = [TextContent(type="text", text=render_result(result))]
    content.extend(_artifact_content(a.name, a.mime_type, a.content) for a in result.artifacts)
    return CallToolResult(content=content, is_error=result.status is not Status.SUCCESS)


def _refusal(message: str) -> CallToolResult:
    return CallToolResult(content=[TextContent(type="text", text=message)], is_error=True)


# ---------------------------------------------------------------- another replica's sessions


async def _on_peer(
    ctx: Context[Any, Any], base_url: str, method: str, session_id: str, suffix: str, body: dict[str, Any] | None
) -> CallToolResult:
    """A session tool call for another replica's session, made on that replica's HTTP API
    with the caller's own key (so that it checks the owner and counts the quotas once)."""
    gone = f"no session {session_id!r}: its replica is gone; create a new one"
    if not base_url:
        return _refusal(gone)
    request = getattr(ctx.request_context, "request", None)
    headers = {FORWARDED_BY_HEADER: "mcp"}
    if isinstance(request, Request):
        headers.update({k: v for k, v in request.headers.items() if k in ("authorization", "x-api-key")})
    try:
        async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=CONNECT_TIMEOUT_S), trust_env=False) as http:
            response = await http.request(method, f"{base_url}/v1/sessions/{quote(session_id, safe='')}{suffix}",
                                          json=body, headers=headers)
    except (httpx.ConnectError, httpx.ConnectTimeout):
        return _refusal(gone)
    except httpx.TransportError as exc:
        return _refusal(f"session {session_id!r}: its replica failed while answering ({type(exc).__name__}); try again")
    if response.status_code == 204:
        return CallToolResult(content=[TextContent(type="text", text=f"session {session_id} closed")])
    if response.status_code == 200:
        return tool_result(result_from_json(response.json()))
    try:
        detail = response.json().get("detail")
    except ValueError:
        detail = response.text
    if response.status_code == 404:
        return _refusal(f"{detail}: the session was closed, expired or ended; create a new one")
    return _refusal(str(detail))


# ---------------------------------------------------------------- the server


def build_mcp(
    settings: Settings,
    executor: Executor,
    sessions: SessionManager | None,
    *,
    owner_of: Callable[[Request | None], str | None] | None = None,
    lifespan: Callable[[MCPServer[Any]], AbstractAsyncContextManager[Any]] | None = None,
    quotas: Quotas | None = None,
) -> MCPServer[Any]:
    """The MCP server over ``executor`` (run_code) and ``sessions`` (the session tools;
    without a manager they are not offered). ``owner_of(request)`` names the owner of the
    sessions a tool call makes and may use (the API key's name), from the HTTP request of
    the call (None over stdio); without it every session's owner is None, as when keys are
    off. With ``quotas``, run_code and run_in_session hold the owner's concurrency slot and
    spend a unit of its rate, as the HTTP endpoints do (a refusal is an ``isError`` result).
    Neither executor nor manager is started here: their owner does it
    (the HTTP app's lifespan, or ``lifespan``, which stdio's :func:`serve_stdio` uses)."""
    from execbox import __version__

    server: MCPServer[Any] = MCPServer(
        "execbox", title="execbox code sandbox", version=__version__, lifespan=lifespan,
        log_level=settings.log_level.upper(),  # type: ignore[arg-type]
        instructions=(
            "execbox runs Python and Node.js code in isolated sandboxes. Use run_code for one-off computations "
            "(define main, return the answer); use create_session + run_in_session to work in steps on the same "
            "data, and close_session when done. Save charts and files under artifacts/ to see them."
        ),
    )
    descriptions = _descriptions(settings)
    runs = ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=False,
                           open_world_hint=bool(settings.egress_rules))

    def too_large(code: str) -> CallToolResult | None:
        size = len(code.encode("utf-8", "surrogatepass"))
        if size <= settings.max_code_size:
            return None
        return _refusal(f"the code is {size} bytes, more than the {settings.max_code_size} accepted: send less code")

    def owner(ctx: Context[Any, Any]) -> str | None:
        if owner_of is None:
            return None
        request = getattr(ctx.request_context, "request", None)
        return owner_of(request if isinstance(request, Request) else None)

    def admitted(ctx: Context[Any, Any]) -> AbstractAsyncContextManager[None]:
        return quotas.admit(owner(ctx)) if quotas is not None else contextlib.nullcontext()

    async def run_code(ctx: Context[Any, Any], code: Code, language: LanguageArg = _LANGUAGES[0],
                       arguments: Annotated[dict[str, Any] | None, Field(description="the arguments of main")] = None,
                       ) -> CallToolResult:
        if (refused := too_large(code)) is not None:
            return refused
        request = ExecutionRequest(language=Language(language), code=code, arguments=arguments or {})
        try:
            async with admitted(ctx):
                return tool_result(await executor.execute(request))
        except (BadRequestError, LimitExceededError, UnavailableError) as exc:
            return _refusal(str(exc))

    server.add_tool(run_code, title="Run code in a fresh sandbox", description=descriptions["run_code"],
                    annotations=runs)
    if sessions is None:
        return server

    async def create_session(
        ctx: Context[Any, Any], language: LanguageArg = _LANGUAGES[0]
    ) -> Annotated[CallToolResult, SessionCreated]:
        try:
            info = await sessions.create(SessionRequest(language=Language(language)), owner(ctx))
        except (LimitExceededError, BadRequestError) as exc:
            return _refusal(f"no session created: {exc}")
        text = (f"session_id: {info.id} ({info.language.value}, backend {info.backend}); it ends after "
                f"{info.idle_timeout_s:g} s without a call, at the latest {info.expires_at - info.created_at:g} s "
                "from now, or at close_session")
        return CallToolResult(content=[TextContent(type="text", text=text)],
                              structured_content=SessionCreated(session_id=info.id).model_dump())

    async def run_in_session(ctx: Context[Any, Any], session_id: SessionId, code: Code) -> CallToolResult:
        if (refused := too_large(code)) is not None:
            return refused
        if (peer := foreign_session_url(settings, session_id)) is not None:
            return await _on_peer(ctx, peer, "POST", session_id, "/execute", {"code": code})
        try:
            async with admitted(ctx):
                return tool_result(await sessions.execute(session_id, CellRequest(code=code), owner(ctx)))
        except NotFoundError as exc:
            return _refusal(f"{exc}: the session was closed, expired or ended; create a new one")
        except (BadRequestError, LimitExceededError, UnavailableError) as exc:
            return _refusal(str(exc))

    async def close_session(ctx: Context[Any, Any], session_id: SessionId) -> CallToolResult:
        if (peer := foreign_session_url(settings, session_id)) is not None:
            return await _on_peer(ctx, peer, "DELETE", session_id, "", None)
        try:
            await sessions.delete(session_id, owner(ctx))
        except NotFoundError as exc:
            return _refusal(f"{exc}: nothing to close")
        return CallToolResult(content=[TextContent(type="text", text=f"session {session_id} closed")])

    server.add_tool(create_session, title="Start a stateful session", description=descriptions["create_session"],
                    annotations=ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=False,
                                                open_world_hint=False))
    server.add_tool(run_in_session, title="Run a cell in a session", description=descriptions["run_in_session"],
                    annotations=runs)
    server.add_tool(close_session, title="Close a session", description=descriptions["close_session"],
                    annotations=ToolAnnotations(read_only_hint=False, destructive_hint=True, idempotent_hint=True,
                                                open_world_hint=False))
    return server


@dataclass(frozen=True)
class MCPHttpApp:
    """MCP's streamable HTTP transport for the service: route ``asgi`` at :data:`MCP_PATH`
    (``app.router.add_route(MCP_PATH, mcp_http.asgi, include_in_schema=False)``) and enter
    ``lifespan()`` in the app's lifespan, after the executor and the sessions started."""

    asgi: ASGIApp
    lifespan: Callable[[], AbstractAsyncContextManager[None]]


def mcp_http_app(server: MCPServer[Any], settings: Settings) -> MCPHttpApp:
    """The ASGI app and lifespan of ``server`` over streamable HTTP (stateless, SSE answers),
    with the service's body limit (SANDBOX_MAX_BODY_SIZE). Bound to a loopback address, it refuses
    requests whose Host or Origin is not loopback (the SDK's DNS-rebinding protection)."""
    security = None
    if settings.bind_host in ("127.0.0.1", "localhost", "::1"):
        security = TransportSecuritySettings(
            enable_dns_rebinding_protection=True,
            allowed_hosts=["127.0.0.1:*", "localhost:*", "[::1]:*"],
            allowed_origins=["http://127.0.0.1:*", "http://localhost:*", "http://[::1]:*"],
        )
    app = server.streamable_http_app(
        streamable_http_path=MCP_PATH, stateless_http=True, transport_security=security,
        max_request_body_size=settings.max_body_size, host=settings.bind_host,
    )
    return MCPHttpApp(asgi=app, lifespan=server.session_manager.run)


async def serve_stdio(settings: Settings, pool_size: int = 1) -> None:
    """Serve MCP on stdin/stdout until the host closes stdin. The executor (``pool_size``
    warm sandboxes per language) and the sessions start once the SDK holds stdout, so that
    no child process inherits the protocol's descriptor; every sandbox is gone on return."""
    executor = Executor(settings, pool_size=pool_size)
    sessions = SessionManager(settings, executor)

    @contextlib.asynccontextmanager
    async def lifespan(_: MCPServer[Any]) -> AsyncIterator[None]:
        async with executor:
            for warning in executor.warnings:
                log.warning("%s", warning)
            log.info("execbox MCP server on stdio, %s backend", executor.backend_name)
            await sessions.start()
            try:
                yield
            finally:
                await sessions.close()

    await build_mcp(settings, executor, sessions, lifespan=lifespan).run_stdio_async()
