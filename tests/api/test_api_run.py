"""RAGFlow's ``POST /run`` contract (docs/api.md section 1) against a real service.

Every verdict a user's program can get, with the field values RAGFlow branches on.
The rows that need their own service (time limit, pool busy, rate limit, internal
fault) are in test_api_limits.py.
"""

from __future__ import annotations

import base64
import json
import re
import uuid
from typing import Any

import httpx
from api_helpers import BACKEND, RUN_FIELDS, run_body

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run(client: httpx.Client, code: str, language: str | None = None, arguments: Any = None) -> dict[str, Any]:
    response = client.post("/run", json=run_body(code, language, arguments))
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == RUN_FIELDS, f"fields differ from docs/api.md: {sorted(set(body) ^ RUN_FIELDS)}"
    return body


# -- health -------------------------------------------------------------------------


def test_root_and_healthz_say_ok(client: httpx.Client) -> None:
    for path in ("/", "/healthz"):
        response = client.get(path)
        assert response.status_code == 200, response.text
        assert response.json()["status"] == "ok"


# -- success ------------------------------------------------------------------------


def test_success_returns_result_stdout_and_usage(client: httpx.Client) -> None:
    code = "def main(a, b=2):\n    print('sum of', a, b)\n    return {'sum': a + b, 'items': [a, b]}\n"
    body = run(client, code, arguments={"a": 40})
    assert body["status"] == "success"
    assert body["exit_code"] == 0
    assert body["stdout"] == "sum of 40 2\n"
    assert body["stderr"] == ""
    assert body["result"] == {"present": True, "value": {"sum": 42, "items": [40, 2]}, "type": "json"}
    assert body["artifacts"] == []
    assert body["resource_limit_type"] is None
    assert body["unauthorized_access_type"] is None
    assert body["runtime_error_type"] is None
    assert isinstance(body["time_used_ms"], float) and body["time_used_ms"] >= 0
    assert isinstance(body["memory_used_kb"], float) and body["memory_used_kb"] > 0


def test_language_defaults_to_python_and_arguments_to_empty(client: httpx.Client) -> None:
    body = run(client, "def main():\n    return 'no arguments'\n")
    assert body["status"] == "success"
    assert body["result"]["value"] == "no arguments"


def test_async_main_in_python(client: httpx.Client) -> None:
    body = run(client, "async def main(x):\n    return x * 2\n", arguments={"x": 21})
    assert body["status"] == "success", body
    assert body["result"]["value"] == 42


def test_stderr_is_reported_on_success(client: httpx.Client) -> None:
    body = run(client, "import logging\ndef main():\n    logging.warning('careful')\n    return 1\n")
    assert body["status"] == "success"
    assert "careful" in body["stderr"]


def test_main_returning_none_has_a_present_null_result(client: httpx.Client) -> None:
    body = run(client, "def main():\n    print('side effect only')\n")
    assert body["status"] == "success"
    assert body["stdout"] == "side effect only\n"
    assert body["result"] is None or body["result"]["value"] is None


def test_unicode_source_and_output(client: httpx.Client) -> None:
    code = "def main(name):\n    print('héllo', name)\n    return '✓ ' + name\n"
    body = run(client, code, arguments={"name": "wörld"})
    assert body["status"] == "success"
    assert body["stdout"] == "héllo wörld\n"
    assert body["result"]["value"] == "✓ wörld"


# -- Node.js ------------------------------------------------------------------------


def test_javascript_is_an_alias_of_nodejs(client: httpx.Client) -> None:
    code = "function main(args) {\n  console.log('hi ' + args.name);\n  return {greeting: 'hi ' + args.name};\n}\n"
    body = run(client, code, language="javascript", arguments={"name": "ragflow"})
    assert body["status"] == "success", body
    assert body["stdout"] == "hi ragflow\n"
    assert body["result"]["value"] == {"greeting": "hi ragflow"}


def test_nodejs_async_main_with_module_exports(client: httpx.Client) -> None:
    code = "async function main({arg1, arg2}) {\n  return arg1 + arg2;\n}\nmodule.exports = { main };\n"
    body = run(client, code, language="nodejs", arguments={"arg1": "a", "arg2": "b"})
    assert body["status"] == "success", body
    assert body["result"]["value"] == "ab"


def test_nodejs_packages_are_available(client: httpx.Client) -> None:
    code = "const axios = require('axios');\nfunction main() {\n  return typeof axios.get;\n}\n"
    body = run(client, code, language="nodejs")
    assert body["status"] == "success", body
    assert body["result"]["value"] == "function"


def test_nodejs_exception_is_program_error(client: httpx.Client) -> None:
    body = run(client, "function main() {\n  throw new Error('kaput');\n}\n", language="nodejs")
    assert body["status"] == "program_error"
    assert body["exit_code"] != 0
    assert "kaput" in body["stderr"]


def test_nodejs_abort_is_a_signalled_runtime_error(client: httpx.Client) -> None:
    body = run(client, "function main() {\n  process.abort();\n}\n", language="nodejs")
    assert body["status"] == "runtime_error", body
    assert body["runtime_error_type"] == "signalled"
    assert body["exit_code"] == -6  # SIGABRT


# -- the program's own failures -----------------------------------------------------


def test_exception_is_program_error_with_traceback(client: httpx.Client) -> None:
    body = run(client, "def main():\n    print('partial')\n    raise ValueError('boom')\n")
    assert body["status"] == "program_error"
    assert body["exit_code"] != 0
    assert body["stdout"] == "partial\n"
    assert "ValueError: boom" in body["stderr"]
    assert "Traceback" in body["stderr"]
    assert body["result"] is None


def test_syntax_error_is_program_error(client: httpx.Client) -> None:
    body = run(client, "def main(:\n    return 1\n")
    assert body["status"] == "program_error"
    assert "SyntaxError" in body["stderr"]


def test_missing_main_is_program_error(client: httpx.Client) -> None:
    body = run(client, "x = 1\n")
    assert body["status"] == "program_error"
    assert "main" in body["stderr"]


def test_oom_kill_is_minus_137(client: httpx.Client) -> None:
    code = (
        "def main():\n"
        "    print('allocating', flush=True)\n"
        "    hog = []\n"
        "    while True:\n"
        "        hog.append(bytearray(16 * 1024 * 1024))\n"
    )
    body = run(client, code)
    assert body["status"] == "resource_limit_exceeded", body
    assert body["resource_limit_type"] == "memory"
    assert body["exit_code"] == -137
    assert "Memory limit exceeded (killed by OOM)" in body["stderr"]
    assert body["stdout"] == "allocating\n"  # partial output is kept


def test_memory_error_keeps_the_programs_exit_code(client: httpx.Client) -> None:
    # 1 EiB cannot be mapped on any host, so the allocation fails inside Python (MemoryError)
    body = run(client, "def main():\n    return len(bytearray(1 << 60))\n")
    assert body["status"] == "resource_limit_exceeded", body
    assert body["resource_limit_type"] == "memory"
    assert body["exit_code"] not in (0, -137)
    assert "MemoryError" in body["stderr"]


def test_file_access_outside_the_workspace_is_unauthorized(client: httpx.Client) -> None:
    code = "from pathlib import Path\ndef main():\n    Path('/usr/evil').write_text('x')\n"
    body = run(client, code)
    assert body["status"] == "unauthorized_access", body
    assert body["unauthorized_access_type"] == "file_access"


def test_network_access_is_unauthorized(client: httpx.Client) -> None:
    code = (
        "import urllib.request\n"
        "def main():\n"
        "    return urllib.request.urlopen('http://1.1.1.1', timeout=3).status\n"
    )
    body = run(client, code)
    assert body["status"] == "unauthorized_access", body
    assert body["unauthorized_access_type"] == "network_access"


# -- static inspection --------------------------------------------------------------


def test_unsafe_code_is_minus_999_with_line_numbers(client: httpx.Client) -> None:
    code = "import json\n\nimport os\ndef main():\n    return os.listdir('/')\n"
    body = run(client, code)
    assert body["status"] == "program_runner_error"
    assert body["exit_code"] == -999
    assert body["detail"] == "Code is unsafe"
    assert re.search(r"^Line 3: .*os", body["stderr"], re.MULTILINE), body["stderr"]
    assert body["result"] is None


def test_unsafe_javascript_is_minus_999(client: httpx.Client) -> None:
    code = "const cp = require('child_process');\nfunction main() {\n  return cp.execSync('id').toString();\n}\n"
    body = run(client, code, language="nodejs")
    assert body["exit_code"] == -999
    assert body["detail"] == "Code is unsafe"
    assert "Line 1:" in body["stderr"]


# -- artifacts ----------------------------------------------------------------------


def test_matplotlib_png_is_returned_as_an_artifact(client: httpx.Client) -> None:
    code = (
        "from pathlib import Path\n"
        "import matplotlib\n"
        "matplotlib.use('Agg')\n"
        "import matplotlib.pyplot as plt\n"
        "def main():\n"
        "    Path('artifacts').mkdir(exist_ok=True)\n"
        "    fig, ax = plt.subplots()\n"
        "    ax.plot([1, 2, 3], [1, 4, 9])\n"
        "    fig.savefig('artifacts/plot.png')\n"
        "    Path('artifacts/table.csv').write_text('a,b\\n1,2\\n')\n"
        "    Path('artifacts/notes.txt').write_text('not an allowed type')\n"
        "    return 'plotted'\n"
    )
    body = run(client, code)
    assert body["status"] == "success", body["stderr"]
    by_name = {a["name"]: a for a in body["artifacts"]}
    assert set(by_name) == {"plot.png", "table.csv"}, "only allowed types are returned"
    png = by_name["plot.png"]
    data = base64.b64decode(png["content_b64"], validate=True)
    assert data.startswith(PNG_MAGIC)
    assert png["mime_type"] == "image/png"
    assert png["size"] == len(data) > 1000
    csv = by_name["table.csv"]
    assert base64.b64decode(csv["content_b64"]) == b"a,b\n1,2\n"
    assert csv["mime_type"] == "text/csv"


def test_no_artifacts_survive_into_the_next_execution(client: httpx.Client) -> None:
    write = (
        "from pathlib import Path\ndef main():\n"
        "    Path('artifacts').mkdir(exist_ok=True)\n    Path('artifacts/a.json').write_text('1')\n"
    )
    assert run(client, write)["artifacts"]
    look = "from pathlib import Path\ndef main():\n    return sorted(str(p) for p in Path('.').rglob('*'))\n"
    body = run(client, look)
    assert body["status"] == "success"
    assert "artifacts/a.json" not in body["result"]["value"]
    assert body["artifacts"] == []


# -- operations ---------------------------------------------------------------------


def test_one_log_line_per_execution_without_code_or_output(client: httpx.Client, service: Any) -> None:
    marker = f"m{uuid.uuid4().hex}"
    body = run(client, f"def main():\n    # {marker}-in-code\n    print('{marker}-in-output')\n    return 1\n")
    assert body["status"] == "success"
    log = service.log()
    assert marker not in log, "the service logged the code or its output at info level"
    lines = [json.loads(line) for line in log.splitlines()]  # every line is one JSON object
    records = [line["execution"] for line in lines if line["logger"] == "execbox.executions"]
    assert records, "no structured execution line in the log"
    assert {"language", "status", "exit_code", "time_used_ms"} <= set(records[-1])


def test_every_log_line_is_json_and_carries_its_request_id(client: httpx.Client, service: Any) -> None:
    request_id = f"t-{uuid.uuid4().hex}"
    response = client.post("/run", json=run_body("def main():\n    return 1\n"), headers={"X-Request-ID": request_id})
    assert response.headers["x-request-id"] == request_id
    lines = [json.loads(line) for line in service.log().splitlines()]
    assert {"uvicorn.error", "execbox.api"} <= {line["logger"] for line in lines}  # uvicorn's own lines too
    mine = [line for line in lines if line.get("request_id") == request_id]
    assert [line["logger"] for line in mine] == ["execbox.executions"], mine


def test_backend_in_use_is_the_one_under_test(client: httpx.Client) -> None:
    info = client.get("/v1/info").json()
    assert info["backend"] == BACKEND
