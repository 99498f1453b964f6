"""execbox: run untrusted Python and Node.js code in fresh, isolated sandboxes.

The library API: ``Executor`` (run requests in-process), ``Settings``, the models, the
exceptions, and ``Client`` / ``AsyncClient`` (talk to a running service). Every name is
imported lazily, on first use: ``from execbox import Client`` loads the client, the models
and httpx, never the service stack (backends, pools, FastAPI).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from execbox.client import (
        AsyncClient,
        AsyncSession,
        Client,
        OutputEvent,
        ResultEvent,
        Session,
    )
    from execbox.errors import (
        AuthenticationError,
        BadRequestError,
        ExecboxError,
        LimitExceededError,
        NotFoundError,
        ServiceError,
        ServiceUnreachableError,
    )
    from execbox.models import (
        Artifact,
        ExecutionRequest,
        ExecutionResult,
        Language,
        Limits,
        ResourceLimitType,
        ResultValue,
        RuntimeErrorType,
        SessionFile,
        SessionInfo,
        Status,
        UnauthorizedAccessType,
    )
    from execbox.service.executor import Executor
    from execbox.settings import Settings

__all__ = [
    "Artifact",
    "AsyncClient",
    "AsyncSession",
    "AuthenticationError",
    "BadRequestError",
    "Client",
    "ExecboxError",
    "ExecutionRequest",
    "ExecutionResult",
    "Executor",
    "Language",
    "LimitExceededError",
    "Limits",
    "NotFoundError",
    "OutputEvent",
    "ResourceLimitType",
    "ResultEvent",
    "ResultValue",
    "RuntimeErrorType",
    "ServiceError",
    "ServiceUnreachableError",
    "Session",
    "SessionFile",
    "SessionInfo",
    "Settings",
    "Status",
    "UnauthorizedAccessType",
]
#: the module that defines each public name (the rest are in execbox.models)
_HOMES = {
    **dict.fromkeys(("AsyncClient", "AsyncSession", "Client", "OutputEvent", "ResultEvent", "Session"), "execbox.client"),
    **dict.fromkeys(
        ("AuthenticationError", "BadRequestError", "ExecboxError", "LimitExceededError", "NotFoundError",
         "ServiceError", "ServiceUnreachableError"),
        "execbox.errors",
    ),
    "Executor": "execbox.service.executor",
    "Settings": "execbox.settings",
}  # fmt: skip
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'execbox' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES.get(name, "execbox.models")), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
