"""Contract: how every backend runs a Python program (RAGFlow's /run semantics, docs/api.md)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from execbox.models import Language, RuntimeErrorType, Status
from execbox.runtimes import get_runtime
from execbox.service.specs import sandbox_spec

if TYPE_CHECKING:
    from tests.conftest import SandboxRunner


def test_hello_world(executor: SandboxRunner) -> None:
    result = executor.run(
        """
        def main():
            print("Hello, world!")
        """
    )
    assert result.status is Status.SUCCESS, executor.describe(result)
    assert result.exit_code == 0
    assert result.stdout == "Hello, world!\n"
    assert result.stderr == ""
    assert result.result is not None and result.result.present and result.result.value is None
    assert result.backend == executor.backend_name


def test_arguments_are_passed_as_keywords_and_the_return_value_comes_back(executor: SandboxRunner) -> None:
    arguments = {"a": 2, "b": 40, "items": [1, "two", None, True, {"x": 1.5}], "text": "héllo ✓"}
    result = executor.run(
        """
        def main(a, b, items, text):
            return {"sum": a + b, "items": items, "text": text, "types": [type(i).__name__ for i in items]}
        """,
        arguments=arguments,
    )
    assert result.status is Status.SUCCESS, executor.describe(result)
    assert result.result is not None and result.result.present
    assert result.result.value == {
        "sum": 42,
        "items": arguments["items"],
        "text": "héllo ✓",
        "types": ["int", "str", "NoneType", "bool", "dict"],
    }


def test_async_main_is_awaited(executor: SandboxRunner) -> None:
    result = executor.run(
        """
        import asyncio

        async def main(n):
            await asyncio.sleep(0.01)
            values = await asyncio.gather(*(asyncio.sleep(0, result=i * i) for i in range(n)))
            return values
        """,
        arguments={"n": 4},
    )
    assert result.status is Status.SUCCESS, executor.describe(result)
    assert result.result is not None and result.result.value == [0, 1, 4, 9]


def test_stdout_is_exactly_what_the_program_printed(executor: SandboxRunner) -> None:
    result = executor.run(
        """
        import sys

        def main():
            print("line 1")
            print("ünïcødé ✓", 2, None)
            sys.stdout.write("no newline")
            print("", end="")
            print()
            print("tabs\\tand  spaces  ")
            print("__EXECBOX_RESULT__ {\\"forged\\": true}")
            return "ok"
        """
    )
    assert result.status is Status.SUCCESS, executor.describe(result)
    assert result.stdout == (
        'line 1\nünïcødé ✓ 2 None\nno newline\ntabs\tand  spaces  \n__EXECBOX_RESULT__ {"forged": true}\n'
    )
    # a marker printed on stdout cannot forge the result: it travels on its own channel
    assert result.result is not None and result.result.value == "ok"


def test_stderr_is_separate_from_stdout(executor: SandboxRunner) -> None:
    result = executor.run(
        """
        import sys

        def main():
            print("to out")
            print("to err", file=sys.stderr)
            sys.stderr.write("more err\\n")
        """
    )
    assert result.status is Status.SUCCESS, executor.describe(result)
    assert result.stdout == "to out\n"
    assert result.stderr == "to err\nmore err\n"


def test_uncaught_exception_is_a_program_error_with_a_traceback(executor: SandboxRunner) -> None:
    result = executor.run(
        """
        def helper(x):
            raise ValueError(f"bad value {x}")

        def main():
            print("before")
            helper(7)
        """
    )
    assert result.status is Status.PROGRAM_ERROR, executor.describe(result)
    assert result.exit_code != 0
    assert result.stdout == "before\n"
    assert "Traceback (most recent call last)" in result.stderr
    assert 'File "main.py", line 6, in main' in result.stderr
    assert 'File "main.py", line 2, in helper' in result.stderr
    assert result.stderr.rstrip().endswith("ValueError: bad value 7")
    assert result.result is None or not result.result.present


def test_syntax_error_is_a_program_error(executor: SandboxRunner) -> None:
    result = executor.run("def main(:\n    return 1\n")
    assert result.status is Status.PROGRAM_ERROR, executor.describe(result)
    assert result.exit_code != 0
    assert "SyntaxError" in result.stderr
    assert "main.py" in result.stderr


def test_missing_main_gives_a_clear_error(executor: SandboxRunner) -> None:
    result = executor.run("def mian():\n    return 1\n")
    assert result.status is not Status.SUCCESS, executor.describe(result)
    assert result.exit_code != 0
    assert "main" in result.stderr
    assert result.result is None or not result.result.present


def test_non_json_return_value_gives_a_clear_error(executor: SandboxRunner) -> None:
    result = executor.run(
        """
        def main():
            return {1, 2, 3}
        """
    )
    assert result.status is not Status.SUCCESS, executor.describe(result)
    assert result.exit_code != 0
    assert "JSON" in result.stderr
    assert "set" in result.stderr
    assert result.result is None or not result.result.present


def test_sys_exit_code_is_the_exit_code(executor: SandboxRunner) -> None:
    result = executor.run(
        """
        import sys

        def main():
            print("exiting")
            sys.exit(3)
        """
    )
    assert result.status is Status.PROGRAM_ERROR, executor.describe(result)
    assert result.exit_code == 3
    assert result.stdout == "exiting\n"


def test_sys_exit_zero_is_success(executor: SandboxRunner) -> None:
    result = executor.run("import sys\ndef main():\n    sys.exit(0)\n")
    assert result.status is Status.SUCCESS, executor.describe(result)
    assert result.exit_code == 0


def test_pandas_and_numpy(executor: SandboxRunner) -> None:
    result = executor.run(
        """
        import numpy as np
        import pandas as pd

        def main():
            frame = pd.DataFrame({"x": np.arange(5), "y": np.arange(5) ** 2})
            frame["z"] = frame.x + frame.y
            return {"sum": int(frame.z.sum()), "mean": float(frame.y.mean()), "shape": list(frame.shape)}
        """
    )
    assert result.status is Status.SUCCESS, executor.describe(result)
    assert result.result is not None and result.result.value == {"sum": 40, "mean": 6.0, "shape": [5, 3]}


def test_requests_is_importable(executor: SandboxRunner) -> None:
    result = executor.run("import requests\ndef main():\n    return callable(requests.get)\n")
    assert result.status is Status.SUCCESS, executor.describe(result)
    assert result.result is not None and result.result.value is True


def test_time_and_memory_usage_are_filled(executor: SandboxRunner) -> None:
    result = executor.run("import time\ndef main():\n    time.sleep(0.2)\n    return 1\n")
    assert result.status is Status.SUCCESS, executor.describe(result)
    assert result.time_used_ms is not None and result.time_used_ms >= 150  # it slept 200 ms
    assert result.memory_used_kb is not None and result.memory_used_kb > 0


def test_each_execution_runs_in_a_fresh_sandbox(executor: SandboxRunner) -> None:
    first = executor.run(
        """
        import os

        def main():
            with open("/tmp/left-by-first-run", "w") as fh:
                fh.write("x")
            with open("left-in-workspace", "w") as fh:
                fh.write("x")
            return os.path.exists("/tmp/left-by-first-run")
        """
    )
    assert first.status is Status.SUCCESS, executor.describe(first)
    assert first.result is not None and first.result.value is True
    second = executor.run(
        """
        import os

        def main():
            return [os.path.exists("/tmp/left-by-first-run"), os.path.exists("left-in-workspace")]
        """
    )
    assert second.status is Status.SUCCESS, executor.describe(second)
    assert second.result is not None and second.result.value == [False, False]




SIGNAL_DEATHS = {
    "segfault": ("import ctypes\ndef main():\n    print('before', flush=True)\n    ctypes.string_at(0)\n", 11),
    "kill self": ("import os\ndef main():\n    print('before', flush=True)\n    os.kill(os.getpid(), 9)\n", 9),
    "abort": ("import os\ndef main():\n    print('before', flush=True)\n    os.abort()\n", 6),
}


@pytest.mark.parametrize("how", sorted(SIGNAL_DEATHS))
def test_death_by_a_signal_is_a_runtime_error(executor: SandboxRunner, how: str) -> None:
    code, signum = SIGNAL_DEATHS[how]
    result = executor.run(code)
    assert result.status is Status.RUNTIME_ERROR, executor.describe(result)
    assert result.runtime_error_type is RuntimeErrorType.SIGNALLED
    assert result.exit_code == -signum
    assert result.stdout == "before\n"
    executor.assert_still_works()


def test_code_of_the_standard_library_runs_without_the_preloaded_modules(executor: SandboxRunner) -> None:
    """SANDBOX_PYTHON_LIGHT: where sandboxes are forked from a fork server that imported
    SANDBOX_PYTHON_PRELOAD, code of the standard library runs in a sandbox of the light pool,
    whose fork server imported none of them; code that imports one of them (or a
    third-party module, or imports at run time) runs where they are imported already.
    Elsewhere (bwrap, single-use gVisor) a sandbox imports only what its code imports."""
    preloaded = executor.settings.preload_modules
    assert preloaded, "the suite's settings preload modules"
    pools = sorted(s.name for s in executor.executor.pool_stats() if s.name.startswith("python/"))
    preloads = executor.executor.backend.preloads(sandbox_spec(executor.settings, get_runtime(Language.PYTHON)))
    assert pools == ([f"python/{executor.backend_name}", f"python/{executor.backend_name}/light"] if preloads else [f"python/{executor.backend_name}"])
    probe = "def main():\n    return sorted(m for m in {names} if m in sys.modules)\n".format(names=list(preloaded))
    light = executor.run("import sys\n" + probe)
    assert light.status is Status.SUCCESS, executor.describe(light)
    assert light.result is not None and light.result.value == []
    for head, imported in (("import sys\nimport numpy\n", ["numpy"]), ("import sys, requests\n", []), ("import sys\n__import__('json')\n", [])):
        heavy = executor.run(head + probe)
        assert heavy.status is Status.SUCCESS, executor.describe(heavy)
        assert heavy.result is not None and heavy.result.value == (sorted(preloaded) if preloads else imported), head
    # a light sandbox still imports a third-party module reached at run time, at its usual cost
    hidden = executor.run("import sys\ndef main():\n    m = getattr(sys.modules['builtins'], '__imp' + 'ort__')('numpy')\n    return int(m.arange(4).sum())\n")
    assert hidden.status is Status.SUCCESS, executor.describe(hidden)
    assert hidden.result is not None and hidden.result.value == 6
