"""The MCP server through the SDK's own client, over both transports: stdio (``execbox
mcp`` as a subprocess) and streamable HTTP (a real uvicorn serving /mcp as the service
does). Real sandboxes (the api suite's backend, namespaces by default), pools of one."""

from __future__ import annotations

import base64
import json
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from api_helpers import Service, free_port
from mcp_helpers import (
    Connection,
    UvicornThread,
    service_app,
    stdio_server,
)
from mcp_types import CallToolResult, EmbeddedResource, ImageContent, TextContent

from execbox.settings import Settings

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
START_TIMEOUT_S = 120.0


def _settings_of(service: Service) -> Settings:
    fields = {k.removeprefix("SANDBOX_").lower(): v for k, v in service.settings.items()}
    return Settings.load(env_file=None, **fields)


@pytest.fixture(scope="module", params=["stdio", "http"])
def mcp(request: pytest.FixtureRequest, backend_ready: None, event_loop_thread: Any) -> Iterator[Connection]:
    """A connected MCP client over one transport, to a server with pools of one sandbox."""
    service = Service(f"mcp-{request.param}", {"SANDBOX_EXECUTOR_MANAGER_POOL_SIZE": "1"})
    server = None
    try:
        if request.param == "stdio":
            target: Any = stdio_server(service.settings, service.workdir)
        else:
            server = UvicornThread(service_app(_settings_of(service)), free_port(), event_loop_thread.loop)
            server.wait_started(START_TIMEOUT_S)
            target = server.url
        connection = Connection(target, event_loop_thread.loop)
        connection.wait_connected(START_TIMEOUT_S)
        yield connection
        connection.close()
    finally:
        if server is not None:
            server.stop()
        service.cleanup()


def call(mcp: Connection, tool: str, **arguments: Any) -> CallToolResult:
    return mcp.call(lambda client: client.call_tool(tool, arguments))


def text_of(result: CallToolResult) -> str:
    return "\n".join(block.text for block in result.content if isinstance(block, TextContent))


def test_tools_are_listed_with_their_schemas(mcp: Connection) -> None:
    tools = {tool.name: tool for tool in mcp.call(lambda client: client.list_tools()).tools}
    assert set(tools) == {"run_code", "create_session", "run_in_session", "close_session"}
    run_code = tools["run_code"]
    schema = run_code.input_schema
    assert schema["required"] == ["code"]
    assert schema["properties"]["language"]["enum"] == ["python", "nodejs"]
    assert schema["properties"]["language"]["default"] == "python"
    assert "object" in json.dumps(schema["properties"]["arguments"])
    for phrase in ("main", "artifacts/", "numpy", "pandas", "matplotlib", "axios", "Network: none", "10 s wall time"):
        assert phrase in run_code.description, phrase
    assert tools["run_in_session"].input_schema["required"] == ["session_id", "code"]
    assert tools["close_session"].input_schema["required"] == ["session_id"]
    assert tools["create_session"].output_schema["properties"]["session_id"]["type"] == "string"


def test_run_code_python(mcp: Connection) -> None:
    code = "def main(name, n):\n    print('hello', name)\n    return {'twice': n * 2}\n"
    result = call(mcp, "run_code", code=code, arguments={"name": "mcp", "n": 21})
    text = text_of(result)
    assert result.is_error is False, text
    assert text.startswith("status: success")
    assert 'result: {"twice": 42}' in text
    assert "stdout:\nhello mcp" in text


def test_run_code_nodejs(mcp: Connection) -> None:
    code = "async function main(args) {\n  console.log('from node', args.x);\n  return [args.x, typeof require];\n}\n"
    result = call(mcp, "run_code", code=code, language="nodejs", arguments={"x": 7})
    text = text_of(result)
    assert result.is_error is False, text
    assert 'result: [7, "function"]' in text
    assert "from node 7" in text


def test_a_failing_program_is_an_error_result_with_its_traceback(mcp: Connection) -> None:
    result = call(mcp, "run_code", code="def main():\n    raise ValueError('broken on purpose')\n")
    text = text_of(result)
    assert result.is_error is True
    assert text.startswith("status: program_error")
    assert "ValueError: broken on purpose" in text


def test_a_timeout_is_an_error_result_naming_the_limit(mcp: Connection) -> None:
    result = call(mcp, "run_code", code="function main() { while (true) {} }", language="nodejs")
    assert result.is_error is True
    assert "status: resource_limit_exceeded (time)" in text_of(result)
    assert "exit code -124" in text_of(result)


def test_a_chart_comes_back_as_an_image(mcp: Connection) -> None:
    code = (
        "import matplotlib.pyplot as plt\n"
        "import pandas as pd\n"
        "def main():\n"
        "    df = pd.DataFrame({'x': [1, 2, 3], 'y': [1, 4, 9]})\n"
        "    df.plot(x='x', y='y')\n"
        "    plt.savefig('artifacts/chart.png')\n"
        "    df.to_csv('artifacts/data.csv', index=False)\n"
        "    return len(df)\n"
    )
    result = call(mcp, "run_code", code=code)
    assert result.is_error is False, text_of(result)
    images = [block for block in result.content if isinstance(block, ImageContent)]
    assert len(images) == 1
    assert images[0].mime_type == "image/png"
    assert base64.b64decode(images[0].data).startswith(PNG_MAGIC)
    resources = [block.resource for block in result.content if isinstance(block, EmbeddedResource)]
    assert [(r.uri, r.mime_type) for r in resources] == [("execbox://artifacts/data.csv", "text/csv")]
    assert resources[0].text.splitlines() == ["x,y", "1,1", "2,4", "3,9"]
    assert "artifacts: chart.png (image/png" in text_of(result)


def test_code_over_the_size_limit_is_refused_as_a_tool_error(mcp: Connection) -> None:
    result = call(mcp, "run_code", code="#" * (1 << 21))
    assert result.is_error is True
    assert "bytes, more than the" in text_of(result)


def test_an_invalid_argument_is_a_tool_error_not_a_protocol_error(mcp: Connection) -> None:
    result = call(mcp, "run_code", code="def main(): return 1", language="ruby")
    assert result.is_error is True
    assert "language" in text_of(result)


@pytest.mark.parametrize(
    ("language", "cells", "expected"),
    [
        ("python", ["import math\nx = 20", "def f(y):\n    return x + y", "f(math.isqrt(4))"], "22"),
        ("nodejs", ["let x = 20", "function f(y) { return x + y; }", "await Promise.resolve(f(2))"], "22"),
    ],
)
def test_a_session_keeps_state_and_is_gone_after_close(
    mcp: Connection, language: str, cells: list[str], expected: str
) -> None:
    created = call(mcp, "create_session", language=language)
    assert created.is_error is False, text_of(created)
    session_id = created.structured_content["session_id"]
    assert session_id in text_of(created)
    for cell in cells:
        result = call(mcp, "run_in_session", session_id=session_id, code=cell)
        assert result.is_error is False, text_of(result)
    assert f"result: {expected}" in text_of(result)

    closed = call(mcp, "close_session", session_id=session_id)
    assert closed.is_error is False
    assert "closed" in text_of(closed)
    after = call(mcp, "run_in_session", session_id=session_id, code="1")
    assert after.is_error is True
    assert "create a new one" in text_of(after)


def test_a_failing_cell_is_an_error_and_the_session_lives_on(mcp: Connection) -> None:
    session_id = call(mcp, "create_session").structured_content["session_id"]
    try:
        call(mcp, "run_in_session", session_id=session_id, code="kept = 5")
        failed = call(mcp, "run_in_session", session_id=session_id, code="1 / 0")
        assert failed.is_error is True
        assert "ZeroDivisionError" in text_of(failed)
        again = call(mcp, "run_in_session", session_id=session_id, code="kept * 2")
        assert again.is_error is False, text_of(again)
        assert "result: 10" in text_of(again)
    finally:
        call(mcp, "close_session", session_id=session_id)


def test_an_unknown_session_is_an_error_result(mcp: Connection) -> None:
    for tool, extra in (("run_in_session", {"code": "1"}), ("close_session", {})):
        result = call(mcp, tool, session_id="no-such-session", **extra)
        assert result.is_error is True, tool


@pytest.fixture(scope="module")
def owners(backend_ready: None, event_loop_thread: Any) -> Iterator[dict[str, Connection]]:
    """Two HTTP connections to one server whose session owner is the X-Test-Owner header."""
    service = Service("mcp-owners", {"SANDBOX_EXECUTOR_MANAGER_POOL_SIZE": "1"})
    app = service_app(_settings_of(service), owner_of=lambda request: request.headers.get("x-test-owner") if request else None)
    server = UvicornThread(app, free_port(), event_loop_thread.loop)
    connections: dict[str, Connection] = {}
    try:
        server.wait_started(START_TIMEOUT_S)
        for name in ("alice", "bob"):
            connections[name] = Connection(server.url, event_loop_thread.loop, headers={"X-Test-Owner": name})
            connections[name].wait_connected(START_TIMEOUT_S)
        yield connections
    finally:
        for connection in connections.values():
            connection.close()
        server.stop()
        service.cleanup()


def test_sessions_belong_to_the_owner_of_the_request(owners: dict[str, Connection]) -> None:
    alice, bob = owners["alice"], owners["bob"]
    session_id = call(alice, "create_session").structured_content["session_id"]
    try:
        assert call(alice, "run_in_session", session_id=session_id, code="secret = 1").is_error is False
        for tool, extra in (("run_in_session", {"code": "secret"}), ("close_session", {})):
            refused = call(bob, tool, session_id=session_id, **extra)
            assert refused.is_error is True, tool
        kept = call(alice, "run_in_session", session_id=session_id, code="secret + 1")
        assert "result: 2" in text_of(kept)
    finally:
        assert call(alice, "close_session", session_id=session_id).is_error is False


def test_stdio_stdout_carries_only_the_protocol(backend_ready: None) -> None:
    """Start-up logs (at debug level), the program's output and shutdown go elsewhere: every
    line ``execbox mcp`` writes on stdout is a JSON-RPC message."""
    service = Service("mcp-raw", {"SANDBOX_LOG_LEVEL": "debug"})
    params = stdio_server(service.settings, service.workdir)
    messages = [
        {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "test", "version": "1"}}},
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {
            "name": "run_code", "arguments": {"code": "def main():\n    print('{\"jsonrpc\": \"2.0\"}')\n    return 3\n"}}},
    ]
    process = None
    try:
        with service.log_path.open("wb") as log:  # a file: a full stderr pipe would block the server
            process = subprocess.Popen(
                [params.command, *params.args], env=params.env, cwd=params.cwd,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
            )
        assert process.stdin is not None and process.stdout is not None
        for message in messages[:2]:
            process.stdin.write((json.dumps(message) + "\n").encode())
        process.stdin.flush()
        lines = [process.stdout.readline().decode()]  # the answer to initialize
        process.stdin.write((json.dumps(messages[2]) + "\n").encode())
        process.stdin.flush()
        while '"id":2' not in lines[-1].replace(" ", "") and lines[-1]:
            lines.append(process.stdout.readline().decode())
        process.stdin.close()  # the host goes away: the server exits
        lines += process.stdout.read().decode().splitlines()
        process.wait(START_TIMEOUT_S)
        err = service.log_path.read_bytes()
    finally:
        if process is not None and process.poll() is None:  # a failed test: its sandboxes go first
            process.kill()
            process.wait(START_TIMEOUT_S)
        service.cleanup()
    replies = [json.loads(line) for line in lines if line.strip()]
    assert all(reply.get("jsonrpc") == "2.0" for reply in replies), lines
    assert process.returncode == 0, err.decode()[-2000:]
    assert b"DEBUG" in err or b"INFO" in err, "the logs went to stderr"
    answer = next(reply for reply in replies if reply.get("id") == 2)
    assert answer["result"]["isError"] is False
    assert 'result: 3' in answer["result"]["content"][0]["text"]
