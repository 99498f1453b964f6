"""``execbox`` command line: run, doctor, build, serve, mcp, keys (``--version``, ``--env-file FILE``)."""

from __future__ import annotations

import asyncio
import json
import logging
import logging.config
import os
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from execbox.errors import ConfigurationError, ExecboxError
from execbox.models import ExecutionRequest, Language
from execbox.runtimes import language_names, runtime_for_file

__all__ = ["app"]

app = typer.Typer(help="execbox: run untrusted Python and Node.js code in fresh, isolated sandboxes.", no_args_is_help=True)
#: the settings file of this invocation (``--env-file``; ``.env`` in the working directory by default)
_options: dict[str, Any] = {"env_file": ".env"}


def _version(value: bool) -> None:
    if value:
        from execbox import __version__

        typer.echo(f"execbox {__version__}")
        raise typer.Exit(0)


@app.callback()
def _main(
    env_file: Annotated[
        Optional[Path], typer.Option("--env-file", help="read settings from this file instead of ./.env")
    ] = None,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="print the version and exit")
    ] = False,
) -> None:
    """execbox: run untrusted Python and Node.js code in fresh, isolated sandboxes."""
    if env_file is not None:
        _options["env_file"] = env_file


def _settings(**overrides: Any):  # type: ignore[no-untyped-def]
    from execbox.settings import Settings, unknown_variables

    env_file = _options["env_file"]
    try:
        settings = Settings.load(env_file=env_file, **overrides)
    except ConfigurationError as exc:
        typer.echo(f"execbox: {exc}", err=True)
        raise typer.Exit(2) from exc
    for warning in unknown_variables(env_file=env_file):
        typer.echo(f"execbox: warning: {warning}", err=True)
    return settings


def _result_json(result: Any) -> dict[str, Any]:
    from execbox.wire import result_to_json

    return result_to_json(result, native=True)


@app.command()
def run(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="source file defining main()")],
    language: Annotated[Optional[str], typer.Option(help=f"{' | '.join(language_names())} (default: from the file name)")] = None,
    args: Annotated[str, typer.Option("--args", help="JSON object of arguments for main")] = "{}",
    backend: Annotated[Optional[str], typer.Option(help="gvisor | namespaces (default: SANDBOX_BACKEND)")] = None,
) -> None:
    """Run FILE once in a fresh sandbox and print the result as JSON."""
    from execbox.service.executor import Executor

    # one execution: a bwrap sandbox starts faster than the fork server preloads its modules
    # (unless SANDBOX_FORKSERVER says which: on gVisor's kernel only the fork server works)
    settings = _settings(**({"backend": backend} if backend else {}))
    if "forkserver" not in settings.model_fields_set:
        settings = settings.model_copy(update={"forkserver": False})
    lang = language or runtime_for_file(file.name).name
    try:
        arguments = json.loads(args)
        if not isinstance(arguments, dict):
            raise ValueError("not an object")
        request = ExecutionRequest(language=Language(lang), code=file.read_text(), arguments=arguments)
    except ValueError as exc:
        typer.echo(f"execbox: bad --language or --args: {exc}", err=True)
        raise typer.Exit(2) from exc

    async def once() -> Any:
        async with Executor(settings, languages=(request.language,), pool_size=0) as executor:
            return await executor.execute(request)

    try:
        result = asyncio.run(once())
    except ExecboxError as exc:
        typer.echo(f"execbox: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(json.dumps(_result_json(result), indent=2, ensure_ascii=False))
    raise typer.Exit(0 if result.status.value == "success" else 1)


@app.command()
def doctor() -> None:
    """Say which backends work on this host and, for each that does not, why and how to fix it."""
    from execbox.errors import BackendUnavailableError
    from execbox.runtimes import RUNTIMES
    from execbox.service.backends import BACKEND_NAMES, build_backend
    from execbox.service.environments import environment_ready

    settings = _settings()
    ok_any = False
    for name in BACKEND_NAMES:
        try:
            build_backend(name, settings).check()
        except BackendUnavailableError as exc:
            typer.echo(f"[no]  {name}: {exc}")
        else:
            ok_any = True
            typer.echo(f"[ok]  {name}")
    for runtime in RUNTIMES.values():
        ready = environment_ready(runtime, settings.runtime_dir)
        where = runtime.env_dir(settings.runtime_dir)
        typer.echo(f"[{'ok' if ready else 'no'}]  {runtime.name} environment at {where}"
                   + ("" if ready else " is missing or stale: run `execbox build` (or `make build`)"))
        ok_any = ok_any and ready
    typer.echo(f"selected by SANDBOX_BACKEND={settings.backend.value}")
    raise typer.Exit(0 if ok_any else 1)


@app.command()
def build(force: Annotated[bool, typer.Option(help="rebuild even if up to date")] = False) -> None:
    """Build the runtime environments (packages from runtimes/*/requirements.txt, package.json)."""
    from execbox.service.environments import build_all

    settings = _settings()

    def progress(line: str) -> None:
        typer.echo(f"build: {line}")

    try:
        for name, rebuilt in build_all(settings.runtime_dir, force=force, progress=progress).items():
            typer.echo(f"{name}: {'built' if rebuilt else 'up to date'} in {settings.runtime_dir / name}")
    except ExecboxError as exc:
        typer.echo(f"execbox: {exc}", err=True)
        raise typer.Exit(1) from exc


@app.command()
def serve(
    host: Annotated[Optional[str], typer.Option(help="listen address (default SANDBOX_BIND_HOST)")] = None,
    port: Annotated[Optional[int], typer.Option(help="port (default SANDBOX_EXECUTOR_MANAGER_PORT, 9385)")] = None,
) -> None:
    """Serve the HTTP API (RAGFlow's /run and the native /v1 API)."""
    import uvicorn

    from execbox.api.app import create_app
    from execbox.api.logs import log_config

    settings = _service_settings()
    if os.geteuid() != 0:
        logging.getLogger("execbox").warning("not running as root: the namespaces backend will be unavailable")
    try:
        service = create_app(settings)
    except ExecboxError as exc:  # a malformed keys file, say
        typer.echo(f"execbox: {exc}", err=True)
        raise typer.Exit(2) from exc
    uvicorn.run(
        service,
        host=host or settings.bind_host,
        port=port or settings.executor_manager_port,
        log_level=settings.log_level,
        log_config=log_config(settings.log_level),  # uvicorn's lines in the same JSON
        access_log=settings.log_level == "debug",  # each execution already logs one structured line
        timeout_graceful_shutdown=int(settings.timeout) + 5,
    )


def _service_settings():  # type: ignore[no-untyped-def]
    """The settings of a long-running service (``serve``, ``mcp``), its runtime environments
    checked (exit 1 when none is built) and its logging on stderr, one JSON object a line."""
    from execbox.api.logs import log_config
    from execbox.service.executor import check_environments

    settings = _settings()
    try:
        check_environments(settings)  # the warnings are logged at start-up
    except ExecboxError as exc:
        typer.echo(f"execbox: {exc}", err=True)
        raise typer.Exit(1) from exc
    logging.config.dictConfig(log_config(settings.log_level))
    return settings


@app.command()
def mcp(
    pool_size: Annotated[int, typer.Option(min=0, max=16, help="warm sandboxes kept ready per language")] = 1,
) -> None:
    """Serve MCP (Model Context Protocol) on stdin/stdout, for an agent host that starts execbox
    itself: tools run_code, create_session, run_in_session, close_session (docs/mcp.md). Logs
    go to stderr; stdout carries only the protocol."""
    from execbox.api.mcp import serve_stdio

    settings = _service_settings()
    try:
        asyncio.run(serve_stdio(settings, pool_size=pool_size))
    except KeyboardInterrupt:
        pass
    except ExecboxError as exc:
        typer.echo(f"execbox: {exc}", err=True)
        raise typer.Exit(1) from exc


keys_app = typer.Typer(help="Manage the API keys file (SANDBOX_API_KEYS_FILE); see docs/tenancy.md.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
_KeysFile = Annotated[Optional[Path], typer.Option("--file", help="the keys file (default: SANDBOX_API_KEYS_FILE)")]


def _keys_file(file: Optional[Path]) -> Path:
    if file is not None:
        return file
    configured = _settings().api_keys_file.strip()
    if not configured:
        typer.echo("execbox: SANDBOX_API_KEYS_FILE is not set: set it (in .env or the environment) or pass --file",
                   err=True)
        raise typer.Exit(2)
    return Path(configured)


def _on_keys_file(work: Any) -> Any:
    """``work()``, with a malformed or unwritable keys file said in one line (exit 1)."""
    try:
        return work()
    except (ConfigurationError, OSError) as exc:
        typer.echo(f"execbox: {exc}", err=True)
        raise typer.Exit(1) from exc


@keys_app.command("add")
def keys_add(name: Annotated[str, typer.Argument(help="the key's name (labels metrics, owns sessions)")],
             file: _KeysFile = None) -> None:
    """Make a new key for NAME, add it to the keys file (mode 0600), print it (only this once)."""
    from execbox.service.apikeys import add_key

    path = _keys_file(file)
    typer.echo(_on_keys_file(lambda: add_key(path, name)))
    typer.echo(f"added the key {name!r} to {path}; it is shown only now. A running service accepts it "
               "within a second.", err=True)


@keys_app.command("list")
def keys_list(file: _KeysFile = None) -> None:
    """Print the names of the keys in the keys file, one a line (never the keys)."""
    from execbox.service.apikeys import key_names

    path = _keys_file(file)
    for name in _on_keys_file(lambda: key_names(path)):
        typer.echo(name)


@keys_app.command("revoke")
def keys_revoke(name: Annotated[str, typer.Argument(help="the name of the key to remove")],
                file: _KeysFile = None) -> None:
    """Remove NAME's key from the keys file; a running service refuses it within a second."""
    from execbox.service.apikeys import revoke_key

    path = _keys_file(file)
    if not _on_keys_file(lambda: revoke_key(path, name)):
        typer.echo(f"execbox: {path} has no key named {name!r}", err=True)
        raise typer.Exit(1)
    typer.echo(f"revoked the key {name!r}", err=True)


if __name__ == "__main__":
    app()
