"""SANDBOX_PYTHON_LIGHT: the executor's second Python pool, without the preloaded modules.

Over the unisolated test backend (real drivers as child processes, the real executor and
pools), told that it preloads, so that the executor keeps both pools; which sandbox served a
request is read from the spec it was built with."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from execbox.isolation.base import Sandbox, SandboxSpec
from execbox.isolation.unisolated import UnisolatedTestBackend
from execbox.models import ExecutionRequest, Language, Status
from execbox.service.executor import Executor
from execbox.settings import Settings


class PreloadingBackend(UnisolatedTestBackend):
    """The unisolated backend, declared to preload (as the fork-server backends do); each
    sandbox remembers the preload of the spec it was built for."""

    def __init__(self) -> None:
        super().__init__(i_know_this_is_not_isolated=True)
        self.served: dict[str, tuple[str, ...]] = {}

    def preloads(self, spec: SandboxSpec) -> bool:
        return bool(spec.preload_modules)

    def create(self, spec: SandboxSpec) -> Sandbox:
        sandbox = super().create(spec)
        run = sandbox.run

        def recording_run(*args: Any, **kwargs: Any) -> Any:
            self.served[args[0].code] = spec.preload_modules
            return run(*args, **kwargs)

        sandbox.run = recording_run  # type: ignore[method-assign]
        return sandbox


@pytest.fixture
def scenario(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    """``scenario(settings, body)``: ``await body(executor, backend)`` on a started executor."""
    for name in list(os.environ):
        if name.upper().startswith("SANDBOX_"):
            monkeypatch.delenv(name)
    (tmp_path / "runtimes" / "python").mkdir(parents=True)

    def play(settings: dict[str, Any], body: Callable[[Executor, PreloadingBackend], Awaitable[None]]) -> None:
        config = Settings.load(env_file=None, state_dir=tmp_path, languages="python", code_check="off", **settings)
        backend = PreloadingBackend()

        async def go() -> None:
            async with Executor(config, backend=backend, pool_size=1) as executor:
                assert await executor.wait_ready(60.0)
                await body(executor, backend)

        asyncio.run(go())

    return play


async def _run(executor: Executor, code: str) -> None:
    result = await executor.execute(ExecutionRequest(code=code, language=Language.PYTHON))
    assert result.status is Status.SUCCESS, result


STDLIB = "import json\ndef main():\n    return json.dumps([1])\n"
DYNAMIC = "def main():\n    return __import__('json').dumps([1])\n"
POOL = "python/unisolated-test"


def test_standard_library_code_is_served_by_the_light_pool(scenario: Any) -> None:
    async def body(executor: Executor, backend: PreloadingBackend) -> None:
        assert sorted(s.name for s in executor.pool_stats()) == [POOL, f"{POOL}/light"]
        await _run(executor, STDLIB)
        await _run(executor, DYNAMIC)
        assert backend.served == {STDLIB: (), DYNAMIC: ("json",)}
        assert {s.name: s.recycled_total for s in executor.pool_stats()} == {POOL: 1, f"{POOL}/light": 1}

    scenario({"python_preload": "json"}, body)


def test_the_light_pool_can_be_turned_off(scenario: Any) -> None:
    async def body(executor: Executor, backend: PreloadingBackend) -> None:
        assert [s.name for s in executor.pool_stats()] == [POOL]
        await _run(executor, STDLIB)
        assert backend.served == {STDLIB: ("json",)}

    scenario({"python_preload": "json", "python_light": False}, body)


def test_no_light_pool_without_preloaded_modules(scenario: Any) -> None:
    async def body(executor: Executor, backend: PreloadingBackend) -> None:
        assert [s.name for s in executor.pool_stats()] == [POOL]

    scenario({"python_preload": ""}, body)
