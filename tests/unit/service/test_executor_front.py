"""The Executor's front door, before any sandbox: static inspection and per-request limits."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from execbox.errors import BadRequestError
from execbox.models import ExecutionRequest, Language, Status
from execbox.service.executor import Executor
from execbox.settings import Settings


@pytest.fixture
def settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Settings:
    for name in list(os.environ):
        if name.upper().startswith("SANDBOX_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return Settings.load(code_check="block", timeout="10s", max_memory="256m")


@pytest.fixture
def executor(settings: Settings) -> Iterator[Executor]:
    ex = Executor(settings, backend=None, pool_size=0)  # never started: no sandbox is needed here
    yield ex
    asyncio.run(ex.close())


def test_unsafe_python_is_refused_before_any_sandbox(executor: Executor) -> None:
    result = asyncio.run(executor.execute(ExecutionRequest(code="import os\ndef main():\n    return os.getcwd()\n")))
    assert result.status is Status.PROGRAM_RUNNER_ERROR
    assert result.exit_code == -999
    assert result.detail == "Code is unsafe"
    assert result.stderr.startswith("Line 1: ")
    assert "os" in result.stderr


def test_unsafe_nodejs_is_refused_before_any_sandbox(executor: Executor) -> None:
    code = "const cp = require('child_process');\nfunction main() { return cp.execSync('id').toString(); }\n"
    result = asyncio.run(executor.execute(ExecutionRequest(language=Language.NODEJS, code=code)))
    assert result.status is Status.PROGRAM_RUNNER_ERROR
    assert result.exit_code == -999
    assert result.detail == "Code is unsafe"
    assert "Line 1: " in result.stderr


def _guard_executor(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, mode: str) -> Executor:
    for name in list(os.environ):
        if name.upper().startswith("SANDBOX_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return Executor(Settings.load(code_check=mode), backend=None, pool_size=0)


@pytest.mark.parametrize(
    ("language", "code", "stderr"),
    [
        (
            Language.PYTHON,
            "import pathlib\ndef main():\n    return pathlib.os.popen('id').read()\n",
            "Line 3: Use of 'os.popen' is not allowed [process]\n",
        ),
        (
            Language.NODEJS,
            "function main() { return require('child_' + 'process').execSync('id').toString(); }\n",
            "Line 1: require() with a computed module name is not allowed [computed-name]\n",
        ),
    ],
)
def test_guard_refuses_like_block(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, language: Language, code: str, stderr: str
) -> None:
    executor = _guard_executor(monkeypatch, tmp_path, "guard")
    try:
        result = asyncio.run(executor.execute(ExecutionRequest(language=language, code=code)))
    finally:
        asyncio.run(executor.close())
    assert result.status is Status.PROGRAM_RUNNER_ERROR
    assert result.exit_code == -999
    assert result.detail == "Code is unsafe"
    assert result.stderr == stderr


@pytest.mark.parametrize(
    ("mode", "refused"), [("block", True), ("guard", False), ("warn", False), ("off", False)]
)
def test_everyday_code_under_each_mode(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, mode: str, refused: bool) -> None:
    # `import os` and open(): refused by block (RAGFlow's rules), let through by guard; with no
    # pool running, code that passes the check ends as -3 "no python pool is running"
    code = "import os\ndef main():\n    os.makedirs('artifacts', exist_ok=True)\n    return open('a', 'w').write('x')\n"
    executor = _guard_executor(monkeypatch, tmp_path, mode)
    try:
        result = asyncio.run(executor.execute(ExecutionRequest(code=code)))
    finally:
        asyncio.run(executor.close())
    assert (result.exit_code == -999) is refused, result
    if not refused:
        assert result.exit_code == -3 and "pool" in result.stderr


def test_limits_within_the_maxima_are_used(executor: Executor, settings: Settings) -> None:
    lower = settings.default_limits().model_copy(update={"wall_time_s": 1.0, "memory_bytes": 64 << 20})
    assert executor.limits_for(ExecutionRequest(code="", limits=lower)) == lower
    assert executor.limits_for(ExecutionRequest(code="")) == settings.default_limits()


def test_limits_above_the_maxima_are_a_bad_request(executor: Executor, settings: Settings) -> None:
    higher = settings.default_limits().model_copy(update={"wall_time_s": 3600.0})
    with pytest.raises(BadRequestError, match="wall_time_s"):
        executor.limits_for(ExecutionRequest(code="", limits=higher))
    with pytest.raises(BadRequestError, match="wall_time_s"):
        asyncio.run(executor.execute(ExecutionRequest(code="def main():\n    return 1\n", limits=higher)))


def test_a_repeated_code_gets_the_same_verdict_and_the_blocked_counter_each_time(executor: Executor) -> None:
    """The code check's findings are remembered per code: a repeat is refused (and counted) again,
    and the same text in the other language gets that language's own verdict."""
    unsafe = "import os\ndef main():\n    return os.getcwd()\n"
    first, second = (asyncio.run(executor.execute(ExecutionRequest(code=unsafe))) for _ in range(2))
    assert first == second
    assert first.detail == "Code is unsafe"
    blocked = executor.metrics.registry.get_sample_value(
        "execbox_code_check_blocked_total", {"language": "python", "rule": "import"}
    )
    assert blocked == 2
    # the same text as JavaScript gets JavaScript's verdict (no ``require``: it may run), not Python's
    assert executor.check_code(unsafe, Language.NODEJS) is None
    assert executor.check_code(unsafe, Language.PYTHON) == first


def test_the_code_check_remembers_a_bounded_number_of_codes(executor: Executor) -> None:
    from execbox.service import executor as executor_module

    for n in range(executor_module._CODE_CHECK_CACHE_SIZE + 10):
        assert executor.check_code(f"def main():\n    return {n}\n", Language.PYTHON) is None
    assert len(executor._findings) == executor_module._CODE_CHECK_CACHE_SIZE
    assert executor.check_code("import os\n", Language.PYTHON) is not None  # a new code is inspected anew
