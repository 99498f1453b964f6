"""Fixtures of the in-process HTTP tests: the app over the ``unisolated-test`` backend.

The real drivers run as plain child processes (no root, no isolation: see
execbox/isolation/unisolated.py), behind the real executor, pools and API.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from execbox.api.app import create_app
from execbox.errors import SandboxStartError
from execbox.isolation.base import IsolationBackend, Sandbox, SandboxSpec
from execbox.isolation.unisolated import UnisolatedTestBackend
from execbox.service.executor import Executor
from execbox.settings import Settings

#: the settings of the contract tests' service (small, so that the limits are quick to reach)
CONTRACT_SETTINGS: dict[str, Any] = {
    "code_check": "guard", "timeout": "3s", "max_code_size": "64k", "max_body_size": "1m", "max_output": "64k",
}


@contextmanager
def unisolated_client(state_dir: Path, **settings: Any) -> Iterator[TestClient]:
    """A TestClient of an app over the unisolated test backend, with a clean environment."""
    for runtime in ("python", "nodejs"):
        (state_dir / "runtimes" / runtime).mkdir(parents=True, exist_ok=True)
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.upper().startswith("SANDBOX_")}
    try:
        config = Settings.load(env_file=None, state_dir=state_dir, **settings)
        executor = Executor(config, backend=UnisolatedTestBackend(i_know_this_is_not_isolated=True), pool_size=1)
        with TestClient(create_app(config, executor)) as http:
            assert http.portal is not None
            assert http.portal.call(executor.wait_ready, 60.0), "the unisolated pools did not fill"
            yield http
    finally:
        os.environ.update(saved)


@pytest.fixture(scope="module")
def make_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., TestClient]]:
    """``make_client(**settings)``: a client of its own app, closed at the end of the module."""
    opened: list[Any] = []

    def factory(**settings: Any) -> TestClient:
        context = unisolated_client(tmp_path_factory.mktemp("state"), **{**CONTRACT_SETTINGS, **settings})
        opened.append(context)
        return context.__enter__()

    yield factory
    for context in reversed(opened):
        context.__exit__(None, None, None)


@pytest.fixture(scope="module")
def contract(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client()


@pytest.fixture()
def node() -> None:
    if shutil.which("node") is None and not Path("/usr/bin/node").exists():
        pytest.skip("node is not installed: the Node.js tests need it (apt-get install nodejs)")


class BrokenBackend(IsolationBackend):
    """Builds no sandbox: every create fails (a pool that cannot fill, or one of size 0)."""

    name = "broken-test-backend"

    def check(self) -> None:
        pass

    def create(self, spec: SandboxSpec) -> Sandbox:
        raise SandboxStartError("this test backend builds no sandbox")

    def reap(self) -> int:
        return 0


@pytest.fixture()
def broken_backend() -> IsolationBackend:
    return BrokenBackend()
