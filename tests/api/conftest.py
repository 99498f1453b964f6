"""Fixtures of the HTTP contract tests; see api_helpers.py for how services are run."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from api_helpers import MAX_BODY_SIZE, MAX_CODE_SIZE, Service, backend_unavailable_reason


@pytest.fixture(scope="session")
def backend_ready() -> None:
    reason = backend_unavailable_reason()
    if reason is not None:
        print(f"\nSKIP tests/api: {reason}", file=sys.stderr)
        pytest.skip(reason)


@pytest.fixture(scope="session")
def make_service(backend_ready: None) -> Iterator[Any]:
    """Factory: ``make_service(name, settings, ...)`` starts a service, stopped at session end
    (or earlier by the test, with ``service.stop()``)."""
    started: list[Service] = []

    def factory(name: str, settings: dict[str, str] | None = None, *, runtimes: tuple[str, ...] | None = None,
                empty_runtimes: tuple[str, ...] = (), require_healthy: bool = True) -> Service:
        service = Service(name, settings, runtimes, empty_runtimes)
        started.append(service)
        return service.start(require_healthy=require_healthy)

    yield factory
    for service in started:
        service.cleanup()


@pytest.fixture(scope="module")
def service(make_service: Any) -> Iterator[Service]:
    """The main service: pool of 2, RAGFlow's defaults otherwise, small code and body limits (64 KiB, 1 MiB).

    Module-scoped (not session): no service of these tests outlives its module, so the
    suites that run after tests/api see no stray child process of pytest."""
    service = make_service(
        "main", {"SANDBOX_MAX_CODE_SIZE": str(MAX_CODE_SIZE), "SANDBOX_MAX_BODY_SIZE": str(MAX_BODY_SIZE)}
    )
    yield service
    service.cleanup()


@pytest.fixture(scope="module")
def client(service: Service) -> Iterator[httpx.Client]:
    with service.client() as http:
        yield http
