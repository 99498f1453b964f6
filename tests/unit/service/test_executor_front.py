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
