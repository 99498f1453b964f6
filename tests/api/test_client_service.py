"""The Python client (execbox.Client, execbox.AsyncClient) against a real service: every
method, typed answers, and the service's refusals raised with its own message."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from api_helpers import Service, free_port

from execbox import (
    AsyncClient,
    AuthenticationError,
    BadRequestError,
    Client,
    ExecutionResult,
    Limits,
    NotFoundError,
    OutputEvent,
    ResultEvent,
    ServiceUnreachableError,
    Status,
)
from execbox.settings import Settings

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CHART = (
    "import matplotlib.pyplot as plt\n"
    "def main():\n"
    "    plt.plot([1, 2, 3], [3, 1, 2])\n"
    "    plt.savefig('artifacts/chart.png')\n"
    "    return 'drawn'\n"
)


@pytest.fixture(scope="module")
def execbox_client(service: Service) -> Iterator[Client]:
    with Client(service.url, timeout_s=60) as client:
        yield client


@pytest.fixture(scope="module")
def guarded(service: Service, make_service: Any) -> Iterator[Client]:
    """A client of a service with sessions and SANDBOX_CODE_CHECK=guard (cells read files)."""
    paths = httpx.get(f"{service.url}/openapi.json", timeout=10).json()["paths"]
    if "/v1/sessions" not in paths:
        pytest.skip("the service has no /v1/sessions yet (the session manager and its routes have not landed)")
    other = make_service("client-guard", {"SANDBOX_CODE_CHECK": "guard", "SANDBOX_EXECUTOR_MANAGER_POOL_SIZE": "1"})
    with Client(other.url, timeout_s=60) as client:
        yield client
    other.cleanup()


def test_health_and_info(execbox_client: Client) -> None:
    health = execbox_client.health()
    assert health["status"] == "ok"
    assert execbox_client.healthy() is True
    info = execbox_client.info()
    assert info["backend"] == health["backend"]
    assert set(info["limits"]) == set(Limits.model_fields)


def test_run_python_and_nodejs(execbox_client: Client) -> None:
    py = execbox_client.run("def main(a, b):\n    return a + b\n", arguments={"a": 2, "b": 3})
    assert isinstance(py, ExecutionResult)
    assert py.status is Status.SUCCESS, py.stderr
    assert py.result is not None and py.result.value == 5
    js = execbox_client.run("function main(args) { return args.s.toUpperCase(); }", "javascript", {"s": "node"})
    assert js.status is Status.SUCCESS, js.stderr
    assert js.result is not None and js.result.value == "NODE"


def test_execute_with_limits_files_stdin_and_env(execbox_client: Client) -> None:
    code = (
        "import fileinput\n"
        "from pathlib import Path\n"
        "def main(n):\n"
        "    lines = [line.rstrip() for line in fileinput.input(files=('-',))]\n"
        "    return [n, lines, Path('in/data.bin').read_bytes().hex()]\n"
    )
    limits = Limits(wall_time_s=5, memory_bytes=128 << 20, output_bytes=4096)
    result = execbox_client.execute(
        code, arguments={"n": 1}, stdin="from stdin\n", files={"in/data.bin": b"\x00\xfe"}, limits=limits,
    )
    assert result.status is Status.SUCCESS, result.stderr
    assert result.result is not None and result.result.value == [1, ["from stdin"], "00fe"]
    assert result.backend
    node = execbox_client.execute("function main() { return process.env.K; }", "nodejs", env={"K": "v"})
    assert node.result is not None and node.result.value == "v", node.stderr


def test_a_limit_as_a_dict_is_applied(execbox_client: Client) -> None:
    result = execbox_client.execute("import time\ndef main():\n    time.sleep(30)\n", limits={"wall_time_s": 1})
    assert result.status is Status.RESOURCE_LIMIT_EXCEEDED
    assert result.exit_code == -124


def test_a_chart_comes_back_and_the_result_dumps_to_json(execbox_client: Client) -> None:
    result = execbox_client.execute(CHART)
    assert result.status is Status.SUCCESS, result.stderr
    (chart,) = result.artifacts
    assert chart.content.startswith(PNG_MAGIC) and chart.size == len(chart.content)
    dumped = json.loads(result.model_dump_json())
    assert base64.b64decode(dumped["artifacts"][0]["content"]) == chart.content
    assert ExecutionResult.model_validate_json(result.model_dump_json()) == result


def test_a_refused_request_raises_the_services_message(execbox_client: Client) -> None:
    with pytest.raises(BadRequestError, match=r"limits above the server's maxima: wall_time_s 3600(\.0)? > 10"):
        execbox_client.execute("def main(): return 1", limits={"wall_time_s": 3600})
    with pytest.raises(BadRequestError, match="language"):
        execbox_client.execute("def main(): return 1", "ruby")


def test_execute_stream_yields_output_as_printed_then_the_result(execbox_client: Client) -> None:
    code = "function main() {\n  console.log('one');\n  console.error('two');\n  return 2;\n}\n"
    events = list(execbox_client.execute_stream(code, "nodejs"))
    output = [e for e in events if isinstance(e, OutputEvent)]
    assert "".join(e.text for e in output if e.stream == "stdout") == "one\n"
    assert "".join(e.text for e in output if e.stream == "stderr") == "two\n"
    assert isinstance(events[-1], ResultEvent)
    final = events[-1].result
    assert final.status is Status.SUCCESS and final.stdout == "one\n"
    assert final.result is not None and final.result.value == 2


def test_a_refused_stream_raises(execbox_client: Client) -> None:
    with pytest.raises(BadRequestError, match="limits above the server's maxima"):
        list(execbox_client.execute_stream("def main(): return 1", limits={"memory_bytes": 1 << 40}))


def test_async_client(service: Service) -> None:
    async def scenario() -> tuple[ExecutionResult, list[Any], bool]:
        async with AsyncClient(service.url, timeout_s=60) as client:
            healthy = await client.healthy()
            result = await client.execute("def main():\n    return 'async'\n", limits={"output_bytes": 1000})
            events = [event async for event in client.execute_stream("function main() { console.log('hi'); }",
                                                                       "nodejs")]
            return result, events, healthy

    result, events, healthy = asyncio.run(scenario())
    assert healthy is True
    assert result.result is not None and result.result.value == "async"
    assert events[0] == OutputEvent(stream="stdout", text="hi\n")
    assert isinstance(events[-1], ResultEvent) and events[-1].result.status is Status.SUCCESS


def test_an_unreachable_service_raises_service_unreachable() -> None:
    with Client(f"http://127.0.0.1:{free_port()}", timeout_s=5) as client:
        assert client.healthy() is False
        with pytest.raises(ServiceUnreachableError):
            client.execute("def main(): return 1")


@pytest.mark.parametrize("language", ["python", "nodejs"])
def test_a_session_with_files(guarded: Client, language: str) -> None:
    cells = {
        "python": ["import pandas as pd\ndf = pd.read_csv('in.csv')",
                   "df['b'] = df['a'] * 2\ndf[['b']].to_csv('out.csv', index=False)",
                   "int(df['b'].sum())"],
        "nodejs": ["const fs = require('fs'); let rows = fs.readFileSync('in.csv', 'utf8').trim().split('\\n').slice(1)",
                   "fs.writeFileSync('out.csv', 'b\\n' + rows.map(r => 2 * r).join('\\n') + '\\n')",
                   "rows.reduce((s, r) => s + 2 * Number(r), 0)"],
    }[language]
    with guarded.create_session(language) as session:
        assert session.language.value == language
        assert session.upload("in.csv", b"a\n1\n2\n3\n").size == 8
        for cell in cells:
            result = session.execute(cell)
            assert result.status is Status.SUCCESS, result.stderr
        assert result.result is not None and result.result.value == 12
        assert {f.path for f in session.files()} >= {"in.csv", "out.csv"}
        assert session.download("in.csv") == b"a\n1\n2\n3\n"
        assert session.download("out.csv") == b"b\n2\n4\n6\n"
        assert session.info().executions == len(cells)
        assert session.id in {s.id for s in guarded.list_sessions()}
        with pytest.raises(BadRequestError):
            session.download("../etc/passwd")
        with pytest.raises(NotFoundError):
            session.download("missing.txt")
    with pytest.raises(NotFoundError):
        session.execute("1")
    with pytest.raises(NotFoundError):
        guarded.session(session.id)


def test_an_api_key_is_required_and_accepted(make_service: Any) -> None:
    if "api_keys" not in Settings.model_fields:
        pytest.skip("the service has no API keys yet (SANDBOX_API_KEYS has not landed)")
    keyed = make_service("client-keys", {"SANDBOX_API_KEYS": "tester:k-client-0123456789abcdef"})
    with Client(keyed.url, timeout_s=60) as anonymous, pytest.raises(AuthenticationError):
        anonymous.execute("def main(): return 1")
    with Client(keyed.url, api_key="k-client-0123456789abcdef", timeout_s=60) as client:
        assert client.execute("def main(): return 1").status is Status.SUCCESS
