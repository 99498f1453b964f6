"""execbox: run untrusted Python and Node.js code in fresh, isolated sandboxes.

The library API: ``Executor`` (run requests in-process), ``Settings``, the models, and
``Client`` (talk to a running service).
"""

from execbox.client import Client
from execbox.errors import ExecboxError
from execbox.models import (
    Artifact,
    ExecutionRequest,
    ExecutionResult,
    Language,
    Limits,
    ResourceLimitType,
    ResultValue,
    RuntimeErrorType,
    Status,
    UnauthorizedAccessType,
)
from execbox.service.executor import Executor
from execbox.settings import Settings

__all__ = [
    "Artifact",
    "Client",
    "ExecboxError",
    "ExecutionRequest",
    "ExecutionResult",
    "Executor",
    "Language",
    "Limits",
    "ResourceLimitType",
    "ResultValue",
    "RuntimeErrorType",
    "Settings",
    "Status",
    "UnauthorizedAccessType",
]
__version__ = "0.1.0"
