"""Frozen data shared by every layer: requests, results, verdicts, limits, artifacts.

Field names and status strings follow the RAGFlow ``/run`` contract (see docs/api.md).
"""

from __future__ import annotations

import base64
from enum import StrEnum
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_serializer,
    field_validator,
)

__all__ = [
    "Artifact",
    "CellRequest",
    "ExecutionRequest",
    "ExecutionResult",
    "Language",
    "Limits",
    "ResourceLimitType",
    "ResultValue",
    "RuntimeErrorType",
    "SessionFile",
    "SessionInfo",
    "SessionRequest",
    "SkippedArtifact",
    "Status",
    "UnauthorizedAccessType",
]


class Language(StrEnum):
    """A supported language; ``javascript`` is accepted as an alias of ``nodejs``.

    The wire's list: one member per runtime of ``execbox.runtimes.RUNTIMES``, where all the
    rest about a language is declared (a unit test keeps the two in step). The aliases are
    here because the client parses them without the runtimes.
    """

    PYTHON = "python"
    NODEJS = "nodejs"

    @classmethod
    def _missing_(cls, value: object) -> Language | None:
        if isinstance(value, str) and value.lower() in ("javascript", "js", "node"):
            return cls.NODEJS
        if isinstance(value, str) and value.lower() in ("python3", "py"):
            return cls.PYTHON
        return None


class Status(StrEnum):
    """The verdict on one execution."""

    SUCCESS = "success"
    PROGRAM_ERROR = "program_error"
    RESOURCE_LIMIT_EXCEEDED = "resource_limit_exceeded"
    UNAUTHORIZED_ACCESS = "unauthorized_access"
    RUNTIME_ERROR = "runtime_error"
    PROGRAM_RUNNER_ERROR = "program_runner_error"


class ResourceLimitType(StrEnum):
    TIME = "time"
    MEMORY = "memory"
    OUTPUT = "output"


class UnauthorizedAccessType(StrEnum):
    DISALLOWED_SYSCALL = "disallowed_syscall"
    FILE_ACCESS = "file_access"
    NETWORK_ACCESS = "network_access"


class RuntimeErrorType(StrEnum):
    SIGNALLED = "signalled"
    NONZERO_EXIT = "nonzero_exit"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Limits(_Frozen):
    """The limits one execution may set for itself (each at most the server's), every one
    applied per execution; every unit is in the name. Processes, disk and CPU share are the
    server's (SANDBOX_MAX_PIDS, SANDBOX_MAX_DISK, SANDBOX_CPUS), applied to every sandbox
    when it is prepared, before any request exists."""

    wall_time_s: float = Field(gt=0)
    memory_bytes: int = Field(gt=0)
    output_bytes: int = Field(gt=0)


class ExecutionRequest(_Frozen):
    """What to run: the source, the arguments of ``main`` and optional extras."""

    language: Language = Language.PYTHON
    code: str
    arguments: dict[str, Any] = Field(default_factory=dict)
    stdin: str = ""
    files: dict[str, bytes] = Field(default_factory=dict)
    env: dict[str, str] = Field(default_factory=dict)
    limits: Limits | None = None
    #: requirements installed for this execution only ("tabulate==0.9.0", "is-number@7.0.0"),
    #: within SANDBOX_PACKAGES (see docs/packages.md); () runs in a warm pool sandbox
    packages: tuple[str, ...] = ()
    #: egress patterns for this execution, each covered by the server's (SANDBOX_EGRESS_ALLOW);
    #: None: the server's list; (): no network
    egress: tuple[str, ...] | None = None


class Artifact(_Frozen):
    """A file the program saved under ``artifacts/``.

    As JSON (``model_dump_json()``, ``model_dump(mode="json")``) ``content`` is standard
    base64, and ``model_validate_json`` reads it back; the HTTP answers are written by
    execbox.wire (which names the field ``content_b64``)."""

    name: str
    mime_type: str
    size: int
    content: bytes = Field(repr=False)

    @property
    def content_b64(self) -> str:
        return base64.b64encode(self.content).decode("ascii")

    @field_serializer("content", when_used="json")
    def _content_as_base64(self, content: bytes) -> str:
        return base64.b64encode(content).decode("ascii")

    @field_validator("content", mode="before")
    @classmethod
    def _content_from_base64(cls, value: object, info: ValidationInfo) -> object:
        if info.mode == "json" and isinstance(value, str):
            return base64.b64decode(value, validate=True)
        return value


class SkippedArtifact(_Frozen):
    """A file under ``artifacts/`` that is not in the answer, and why (a cap, its name)."""

    name: str
    reason: str


class ResultValue(_Frozen):
    """What ``main`` returned."""

    present: bool
    value: Any = None
    type: str = "json"


class ExecutionResult(_Frozen):
    """The typed verdict on one execution (RAGFlow's field names)."""

    status: Status
    stdout: str = ""
    stderr: str = ""
    exit_code: int = 0
    detail: str | None = None
    time_used_ms: float | None = None
    memory_used_kb: float | None = None
    cpu_time_ms: float | None = None
    resource_limit_type: ResourceLimitType | None = None
    unauthorized_access_type: UnauthorizedAccessType | None = None
    runtime_error_type: RuntimeErrorType | None = None
    artifacts: tuple[Artifact, ...] = ()
    #: files under artifacts/ left out of ``artifacts`` (over a cap, undecodable name), with why
    artifacts_skipped: tuple[SkippedArtifact, ...] = ()
    result: ResultValue | None = None
    backend: str | None = None


class SessionRequest(_Frozen):
    """What a new session is: its language, its limits (each cell's), its idle timeout, env."""

    language: Language = Language.PYTHON
    limits: Limits | None = None
    #: None: the server's SANDBOX_SESSION_IDLE_TIMEOUT (a request may only shorten it)
    idle_timeout_s: float | None = None
    env: dict[str, str] = Field(default_factory=dict)
    #: requirements installed for the session's whole life, as ExecutionRequest.packages
    packages: tuple[str, ...] = ()


class CellRequest(_Frozen):
    """One cell run in a session's interpreter: names of earlier cells stay visible."""

    code: str
    stdin: str = ""
    #: None: the session's wall time limit (a cell may only shorten it)
    timeout_s: float | None = None


class SessionInfo(_Frozen):
    """The description of a live session."""

    id: str
    language: Language
    backend: str
    created_at: float
    expires_at: float
    idle_timeout_s: float
    last_used_at: float
    executions: int = 0
    #: the API key's name that owns it (None when keys are off); never the key itself
    owner: str | None = None


class SessionFile(_Frozen):
    """A regular file in a session's workspace (path relative to it)."""

    path: str
    size: int
