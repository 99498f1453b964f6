"""Packages per request on a real backend, installed for real from PyPI and the npm registry.

Real sandboxes as root, SANDBOX_PACKAGES=any, the suite's private state directory (so the
package cache starts empty each session). Every test runs on the namespaces backend; the
first also on gVisor (its package sandboxes are gVisor sandboxes of their own, whose bundle
binds the layer). The cache's own rules (LRU, one build for concurrent requests) are in
test_packages_cache_contract.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from execbox.errors import BadRequestError
from execbox.models import CellRequest, ExecutionRequest, Language, SessionRequest, Status
from execbox.service.sessions import SessionManager
from execbox.settings import Settings

_TABULATE = """
import os, tabulate

def main():
    where = os.path.dirname(tabulate.__file__)
    try:
        open(os.path.join(where, "planted.py"), "w").close()
        writable = True
    except OSError:
        writable = False
    return {"version": tabulate.__version__, "where": where, "writable": writable,
            "table": tabulate.tabulate([[1, 2]], headers=["a", "b"], tablefmt="plain")}
"""
_NOT_THERE = """
import importlib.util, os

def main(name):
    return {"found": importlib.util.find_spec(name) is not None, "mount": os.path.exists("/opt/packages")}
"""


@pytest.fixture(scope="module")
def backend_name(request: pytest.FixtureRequest) -> str:
    """namespaces, unless a test asks for more (overrides the suite's every-backend param)."""
    return str(getattr(request, "param", "namespaces"))


@pytest.fixture(scope="module")
def sandbox_settings(sandbox_settings: Settings) -> Settings:
    return sandbox_settings.model_copy(update={"packages": "any"})


def _installs(executor: Any) -> int:
    return int(executor.executor.packages.counts["installs"])


@pytest.mark.parametrize("backend_name", ["namespaces", "gvisor"], indirect=True)
def test_a_wheel_is_importable_in_its_request_only_and_read_only(executor: Any) -> None:
    with_it = executor.run(_TABULATE, packages=("tabulate==0.9.0",))
    assert with_it.status is Status.SUCCESS, executor.describe(with_it)
    value = with_it.result.value
    assert value["version"] == "0.9.0" and value["where"] == "/opt/packages/python/tabulate"
    assert value["table"].split() == ["a", "b", "1", "2"]
    assert value["writable"] is False
    without = executor.run(_NOT_THERE, arguments={"name": "tabulate"})
    assert without.status is Status.SUCCESS, executor.describe(without)
    assert without.result.value == {"found": False, "mount": False}


def test_the_second_request_with_the_same_set_is_served_from_the_cache(executor: Any) -> None:
    first = executor.run(_TABULATE, packages=("tabulate==0.9.0",))
    assert first.status is Status.SUCCESS, executor.describe(first)
    installs, hits = _installs(executor), executor.executor.packages.counts["hits"]
    root = executor.settings.state_dir / "packages"
    layers = {p.name: p.stat().st_ino for p in root.iterdir() if p.is_dir()}
    again = executor.run(_TABULATE, packages=("Tabulate == 0.9.0",))  # the same set, written otherwise
    assert again.status is Status.SUCCESS, executor.describe(again)
    assert _installs(executor) == installs and executor.executor.packages.counts["hits"] == hits + 1
    assert {p.name: p.stat().st_ino for p in root.iterdir() if p.is_dir()} == layers
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no build left behind


def test_a_package_with_only_a_source_distribution_is_refused(executor: Any) -> None:
    with pytest.raises(BadRequestError, match="docopt has only source distributions"):
        executor.run(_NOT_THERE, arguments={"name": "docopt"}, packages=("docopt==0.6.2",))


def test_a_package_that_does_not_exist_is_refused(executor: Any) -> None:
    with pytest.raises(BadRequestError, match="does not exist on the package index"):
        executor.run(_NOT_THERE, arguments={"name": "x"}, packages=("execbox-no-such-package-3b1f",))
    with pytest.raises(BadRequestError, match="no version of tabulate matches"):
        executor.run(_NOT_THERE, arguments={"name": "x"}, packages=("tabulate==99.0",))


def test_a_package_of_the_runtime_is_used_and_never_replaced(executor: Any) -> None:
    with pytest.raises(BadRequestError, match=r"would replace packages of the runtime.*: requests 2\.31\.0 \(the runtime has"):
        executor.run(_NOT_THERE, arguments={"name": "x"}, packages=("requests==2.31.0",))
    satisfied = executor.run(_NOT_THERE, arguments={"name": "requests"}, packages=("requests",))
    assert satisfied.status is Status.SUCCESS, executor.describe(satisfied)
    assert satisfied.result.value == {"found": True, "mount": False}  # nothing to mount


def test_an_npm_package_is_requirable_in_its_request_only(executor: Any) -> None:
    code = "function main() { const n = require('is-number'); return [n(5), n('x'), require.resolve('is-number')] }"
    with_it = executor.run(code, "nodejs", packages=("is-number@7.0.0",))
    assert with_it.status is Status.SUCCESS, executor.describe(with_it)
    assert with_it.result.value == [True, False, "/opt/packages/node_modules/is-number/index.js"]
    without = executor.run(code, "nodejs")
    assert without.status is Status.PROGRAM_ERROR and "Cannot find module 'is-number'" in without.stderr
    with pytest.raises(BadRequestError, match="execbox-no-such-package-3b1f does not exist on the npm registry"):
        executor.run(code, "nodejs", packages=("execbox-no-such-package-3b1f@1.0.0",))


def test_an_unreachable_index_is_a_verdict(executor: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple/")  # nothing listens on port 9
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    result = executor.run(_NOT_THERE, arguments={"name": "x"}, packages=("tabulate==0.8.10",))
    assert result.status is Status.PROGRAM_RUNNER_ERROR and result.detail == "package_install_failed"
    assert "the package index could not be reached" in result.stderr, executor.describe(result)
    monkeypatch.setenv("npm_config_registry", "http://127.0.0.1:9/")
    monkeypatch.setenv("npm_config_fetch_retries", "0")
    result = executor.run("function main() { return 1 }", "nodejs", packages=("left-pad@1.2.0",))
    assert result.status is Status.PROGRAM_RUNNER_ERROR and "npm registry could not be reached" in result.stderr


def test_concurrent_requests_for_one_new_set_install_it_once(executor: Any) -> None:
    request = ExecutionRequest(language=Language.NODEJS, code="function main() { return require('left-pad')('7', 3) }",
                               packages=("left-pad@1.3.0",))  # fmt: skip
    installs = _installs(executor)

    async def both() -> list[Any]:
        return list(await asyncio.gather(executor.executor.execute(request), executor.executor.execute(request)))

    results = executor.loop.run(both(), timeout_s=300)
    assert [r.status for r in results] == [Status.SUCCESS] * 2, [executor.describe(r) for r in results]
    assert [r.result.value for r in results] == ["  7"] * 2
    assert _installs(executor) == installs + 1


@pytest.fixture
def sessions(executor: Any) -> Iterator[SessionManager]:
    manager = SessionManager(executor.settings, executor.executor)
    executor.loop.run(manager.start(), timeout_s=10)
    yield manager
    executor.loop.run(manager.close(), timeout_s=120)


def test_a_session_created_with_packages_imports_them_in_every_cell(executor: Any, sessions: SessionManager) -> None:
    info = executor.loop.run(sessions.create(SessionRequest(packages=("tabulate==0.9.0",))), timeout_s=300)
    for code in ("import tabulate", "tabulate.__version__", "tabulate.tabulate([[1]], tablefmt='plain')"):
        result = executor.loop.run(sessions.execute(info.id, CellRequest(code=code)), timeout_s=60)
        assert result.status is Status.SUCCESS, executor.describe(result)
    assert result.result.value == "1"
    with pytest.raises(BadRequestError, match="does not exist"):
        executor.loop.run(sessions.create(SessionRequest(packages=("execbox-no-such-package-3b1f",))), timeout_s=300)
    assert sessions.count() == 1
