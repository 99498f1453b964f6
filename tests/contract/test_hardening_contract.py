"""Contract (issue 9): on every backend and in both languages, what a program does is a
verdict the host decides and can always serialise, and no output is lost.

* finding 1: a lone surrogate, a deep value, an artifact name that is not UTF-8 give a
  verdict that serialises (the HTTP side is in tests/api/test_api_hardening.py);
* finding 2: output written just before main returns, by a child process, by a thread or
  worker comes back whole; endless writes end in the output verdict;
* finding 3: frames a program writes on the driver's channel cannot forge the verdict, the
  channel is not reachable by name, garbage there is a verdict about the program;
* finding 8: numpy and pandas values convert, Node tracebacks carry no driver frames.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import pytest

from execbox.models import ResourceLimitType, Status
from execbox.wire import RESERVED_EXIT_CODES, dumps, result_to_json

if TYPE_CHECKING:
    from tests.conftest import SandboxRunner


def serialises(result: object) -> dict[str, object]:
    """The /v1 answer of ``result`` as a client would receive it."""
    data: dict[str, object] = json.loads(dumps(result_to_json(result, native=True)))  # type: ignore[arg-type]
    return data


# -- finding 1 -------------------------------------------------------------------------

SURROGATE = {
    "python": "def main():\n    return {'s': 'a\\ud800b'}\n",
    "nodejs": "function main() { return { s: 'a\\ud800b' }; }\n",
}
DEEP = {
    "python": "def main():\n    v = 1\n    for _ in range(800):\n        v = [v]\n    return v\n",
    "nodejs": "function main() { let v = 1; for (let i = 0; i < 800; i++) v = [v]; return v; }\n",
}
BAD_NAME = {
    "python": "def main():\n    with open(b'artifacts/bad\\xff.png', 'wb') as fh:\n        fh.write(b'png')\n    return 1\n",
    "nodejs": (
        "const fs = require('fs');\n"
        "function main() { fs.writeFileSync(Buffer.from('artifacts/bad\\xff.png', 'latin1'), 'png'); return 1; }\n"
    ),
}


@pytest.mark.parametrize("language", ["python", "nodejs"])
def test_lone_surrogate_is_replaced(executor: SandboxRunner, language: str) -> None:
    result = executor.run(SURROGATE[language], language)
    assert result.status is Status.SUCCESS, executor.describe(result)
    assert serialises(result)["result"] == {"present": True, "value": {"s": "a\ufffdb"}, "type": "json"}


@pytest.mark.parametrize("language", ["python", "nodejs"])
def test_too_deep_a_result_is_a_clear_program_error(executor: SandboxRunner, language: str) -> None:
    result = executor.run(DEEP[language], language)
    assert result.status is Status.PROGRAM_ERROR, executor.describe(result)
    assert result.detail == "invalid_result"
    assert "deeper than 100 levels" in result.stderr
    serialises(result)


@pytest.mark.parametrize("language", ["python", "nodejs"])
def test_artifact_name_that_is_not_utf8_is_reported(executor: SandboxRunner, language: str) -> None:
    result = executor.run(BAD_NAME[language], language)
    assert result.status is Status.SUCCESS, executor.describe(result)
    answer = serialises(result)
    assert answer["artifacts"] == []
    assert answer["artifacts_skipped"] == [{"name": "bad\ufffd.png", "reason": "the file name is not valid UTF-8"}]


# -- finding 2 -------------------------------------------------------------------------

OUTPUT = {  # __N__: how many bytes to write
    ("python", "before return"): "import sys\ndef main():\n    sys.stdout.write('x' * __N__)\n    return 1\n",
    ("python", "child process"): (
        "import subprocess, sys\ndef main():\n"
        "    subprocess.run([sys.executable, '-c', 'import sys; sys.stdout.write(\"x\" * __N__)'], check=True)\n"
        "    return 1\n"
    ),
    ("python", "thread"): (
        "import sys, threading\ndef main():\n"
        "    t = threading.Thread(target=lambda: sys.stdout.write('x' * __N__))\n    t.start()\n    t.join()\n    return 1\n"
    ),
    ("nodejs", "before return"): "function main() { process.stdout.write('x'.repeat(__N__)); return 1; }\n",
    ("nodejs", "child process"): (
        "const cp = require('child_process');\n"
        "function main() {\n"
        "  const r = cp.spawnSync(process.execPath, ['-e', \"process.stdout.write('x'.repeat(__N__))\"], { stdio: 'inherit' });\n"
        "  if (r.status !== 0) throw new Error('child failed: ' + JSON.stringify(r));\n"
        "  return 1;\n}\n"
    ),
    ("nodejs", "thread"): (
        "const { Worker } = require('worker_threads');\n"
        "async function main() {\n"
        "  const w = new Worker(\"process.stdout.write('x'.repeat(__N__))\", { eval: true });\n"
        "  await new Promise((resolve, reject) => { w.on('exit', resolve); w.on('error', reject); });\n"
        "  return 1;\n}\n"
    ),
}


@pytest.mark.parametrize("size", [100_000, 500_000])
@pytest.mark.parametrize(("language", "how"), list(OUTPUT))
def test_output_comes_back_whole(executor: SandboxRunner, language: str, how: str, size: int) -> None:
    result = executor.run(OUTPUT[(language, how)].replace("__N__", str(size)), language)
    assert result.status is Status.SUCCESS, executor.describe(result)
    assert len(result.stdout) == size, (len(result.stdout), result.stderr[-500:])


@pytest.mark.parametrize("language", ["python", "nodejs"])
def test_endless_writes_end_in_the_output_verdict(executor: SandboxRunner, language: str) -> None:
    code = {
        "python": "import sys\ndef main():\n    for _ in range(200):\n        sys.stdout.write('z' * (1 << 20))\n    return 1\n",
        "nodejs": "function main() { for (let i = 0; i < 200; i++) process.stdout.write('z'.repeat(1 << 20)); return 1; }\n",
    }[language]
    result = executor.run(code, language)
    assert result.status is Status.RESOURCE_LIMIT_EXCEEDED, executor.describe(result)
    assert result.resource_limit_type is ResourceLimitType.OUTPUT
    assert len(result.stdout) == executor.settings.max_output


# -- finding 3 -------------------------------------------------------------------------

#: a program that looks for the driver's channel as an attacker would: every inherited pipe or
#: socket it may write to whose other end is not in this process (fds 0-2 aside), and writes there
PY_FRAME = """
import json, os, sys
def frame(message):
    body = json.dumps(message).encode()
    return len(body).to_bytes(4, "big") + body
def channels():
    found = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
            flags = int(open(f"/proc/self/fdinfo/{name}").read().split("flags:")[1].split()[0], 8)
        except (OSError, IndexError, ValueError):
            continue
        if target.startswith(("pipe:", "socket:", "host:")):
            found[int(name)] = (target, flags & 3)
    readers = {target for target, mode in found.values() if mode == os.O_RDONLY}
    return [fd for fd, (target, mode) in found.items() if fd > 2 and mode != os.O_RDONLY and target not in readers]
def spray(data):
    for fd in channels():
        try:
            os.write(fd, data)
        except OSError:
            pass
FORGED = frame({"event": "done", "exit_code": 0, "result": {"present": True, "value": "forged"},
                "error_kind": None, "time_ms": -5})
"""
JS_FRAME = """
const fs = require('fs');
function frame(message) {
  const body = Buffer.from(JSON.stringify(message));
  const head = Buffer.alloc(4); head.writeUInt32BE(body.length, 0);
  return Buffer.concat([head, body]);
}
function channels() {
  const found = new Map();
  for (const name of fs.readdirSync('/proc/self/fd')) {
    try {
      const target = fs.readlinkSync('/proc/self/fd/' + name);
      const flags = parseInt(fs.readFileSync('/proc/self/fdinfo/' + name, 'utf8').split('flags:')[1].trim().split(/\\s/)[0], 8);
      if (/^(pipe|socket|host):/.test(target)) found.set(Number(name), [target, flags & 3]);
    } catch (e) {}
  }
  const readers = new Set([...found.values()].filter(([, mode]) => mode === 0).map(([target]) => target));
  return [...found].filter(([fd, [target, mode]]) => fd > 2 && mode !== 0 && !readers.has(target)).map(([fd]) => fd);
}
function spray(data) { for (const fd of channels()) { try { fs.writeSync(fd, data); } catch (e) {} } }
const FORGED = frame({ event: 'done', exit_code: 0, result: { present: true, value: 'forged' }, error_kind: null, time_ms: -5 });
"""
FORGE_THEN = {
    ("python", "hard exit 3"): PY_FRAME + "def main():\n    spray(FORGED)\n    os._exit(3)\n",
    ("python", "sys.exit(3)"): PY_FRAME + "def main():\n    spray(FORGED)\n    sys.exit(3)\n",
    ("python", "raise"): PY_FRAME + "def main():\n    spray(FORGED)\n    raise ValueError('real failure')\n",
    ("nodejs", "hard exit 3"): JS_FRAME + "function main() { spray(FORGED); process.reallyExit(3); }\n",
    ("nodejs", "process.exit(3)"): JS_FRAME + "function main() { spray(FORGED); process.exit(3); }\n",
    ("nodejs", "throw"): JS_FRAME + "function main() { spray(FORGED); throw new Error('real failure'); }\n",
}


@pytest.mark.parametrize(("language", "then"), list(FORGE_THEN))
def test_a_forged_report_does_not_decide_the_verdict(executor: SandboxRunner, language: str, then: str) -> None:
    result = executor.run(FORGE_THEN[(language, then)], language)
    assert result.status is not Status.SUCCESS, executor.describe(result)
    assert result.result is None or result.result.value != "forged"
    assert result.exit_code == (1 if then in ("raise", "throw") else 3), executor.describe(result)
    assert result.time_used_ms is not None and result.time_used_ms >= 0


@pytest.mark.parametrize("exit_code", [-10, -999, -3, -124, 1 << 70, 0])
@pytest.mark.parametrize("language", ["python", "nodejs"])
def test_reserved_exit_codes_cannot_be_forged(executor: SandboxRunner, language: str, exit_code: int) -> None:
    forged = {"event": "done", "exit_code": exit_code, "result": None, "error_kind": None, "time_ms": 1}
    if language == "python":
        code = PY_FRAME + f"def main():\n    spray(frame({forged!r}))\n    return 'real'\n"
    else:
        code = JS_FRAME + f"function main() {{ spray(frame({json.dumps(forged)})); return 'real'; }}\n"
    result = executor.run(code.replace("None", "None" if language == "python" else "null"), language)
    assert result.status is Status.SUCCESS, executor.describe(result)
    assert result.exit_code == 0
    assert result.result is not None and result.result.value == "real"


@pytest.mark.parametrize("language", ["python", "nodejs"])
def test_garbage_on_the_channel_is_a_verdict_about_the_program(executor: SandboxRunner, language: str) -> None:
    if language == "python":
        code = PY_FRAME + "def main():\n    spray((5).to_bytes(4, 'big') + b'{{{{{')\n    return 'real'\n"
    else:
        code = JS_FRAME + "function main() { const h = Buffer.alloc(4); h.writeUInt32BE(5, 0); spray(Buffer.concat([h, Buffer.from('{{{{{')])); return 'real'; }\n"
    result = executor.run(code, language)
    assert result.status is Status.PROGRAM_ERROR, executor.describe(result)
    assert result.detail == "report_channel_violation"
    assert result.exit_code not in RESERVED_EXIT_CODES
    executor.assert_still_works(("python", "nodejs"))


NAMES = {
    "python": """
import os, sys, __main__
def main():
    driver = sys.modules.get("driver")
    return {
        "driver_module": [n for n in dir(driver) if "FD" in n.upper()] if driver else [],
        "main_module": [n for n in dir(__main__) if "FD" in n.upper()],
        "env": sorted(k for k in os.environ if k.startswith("EXECBOX")),
    }
""",
    "nodejs": """
function main() {
  const cached = Object.values(require.cache).map((m) => Object.keys(m.exports || {})).flat();
  return {
    driver_module: cached.filter((n) => /fd/i.test(n)),
    main_module: Object.keys(globalThis).filter((n) => /fd|events|control/i.test(n)),
    env: Object.keys(process.env).filter((k) => k.startsWith('EXECBOX')).sort(),
  };
}
""",
}


@pytest.mark.parametrize("language", ["python", "nodejs"])
def test_the_report_channel_is_not_reachable_by_name(executor: SandboxRunner, language: str) -> None:
    result = executor.run(NAMES[language], language)
    assert result.status is Status.SUCCESS, executor.describe(result)
    assert result.result is not None
    assert result.result.value == {"driver_module": [], "main_module": [], "env": []}


# -- finding 8 -------------------------------------------------------------------------


def test_numpy_and_pandas_values_convert(executor: SandboxRunner) -> None:
    result = executor.run(
        """
        import numpy as np
        import pandas as pd
        def main():
            df = pd.DataFrame({"x": [1, 2], "y": [0.5, None], "t": pd.to_datetime(["2024-01-01", "2024-01-02"])})
            return {
                "int": np.int64(3), "float": np.float64(1.5), "bool": np.bool_(True), "nan": np.float64("nan"),
                "inf": float("inf"), "array": np.arange(6).reshape(2, 3), "frame": df, "series": df["x"],
                "counts": pd.Series(["a", "b", "a"]).value_counts(), "timestamp": pd.Timestamp("2024-05-06T07:08:09"),
            }
        """
    )
    assert result.status is Status.SUCCESS, executor.describe(result)
    assert result.result is not None
    assert result.result.value == {
        "int": 3, "float": 1.5, "bool": True, "nan": None, "inf": None, "array": [[0, 1, 2], [3, 4, 5]],
        "frame": [{"x": 1, "y": 0.5, "t": "2024-01-01T00:00:00"}, {"x": 2, "y": None, "t": "2024-01-02T00:00:00"}],
        "series": [1, 2], "counts": {"a": 2, "b": 1}, "timestamp": "2024-05-06T07:08:09",
    }


def test_node_tracebacks_carry_no_driver_frames(executor: SandboxRunner) -> None:
    result = executor.run("function helper() { throw new Error('boom'); }\nfunction main() { helper(); }\n", "nodejs")
    assert result.status is Status.PROGRAM_ERROR, executor.describe(result)
    assert "Error: boom" in result.stderr
    assert "main.js:1" in result.stderr  # the user's own frame stays
    assert "driver.js" not in result.stderr
    assert "node:internal/modules" not in result.stderr


# -- finding 4, below the HTTP layer ----------------------------------------------------


@pytest.mark.parametrize("memory_bytes", [1, 1 << 20])
@pytest.mark.parametrize("language", ["python", "nodejs"])
def test_a_memory_limit_the_kernel_refuses_is_not_an_internal_fault(
    executor: SandboxRunner, language: str, memory_bytes: int
) -> None:
    code = "def main():\n    return 1\n" if language == "python" else "function main() { return 1; }\n"
    result = executor.run(code, language, limits=executor.limits(memory_bytes=memory_bytes))
    assert result.status in (Status.SUCCESS, Status.RESOURCE_LIMIT_EXCEEDED), executor.describe(result)
    assert result.exit_code != -3
    assert "/sys/fs/cgroup" not in result.stderr and "cgroup" not in result.stderr
    if result.status is Status.RESOURCE_LIMIT_EXCEEDED:
        assert result.resource_limit_type is ResourceLimitType.MEMORY
