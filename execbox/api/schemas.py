"""Wire models of the HTTP API: RAGFlow's /run contract and the native /v1 API.

The answers are built by :mod:`execbox.wire` (the one place that turns a result into
JSON); the models here document them in OpenAPI and validate requests strictly: every
refused value is a 422 whose ``loc`` names the field.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from execbox import wire
from execbox.models import (
    CellRequest,
    ExecutionResult,
    Language,
    Limits,
    ResourceLimitType,
    RuntimeErrorType,
    SessionFile,
    SessionInfo,
    SessionRequest,
    Status,
    UnauthorizedAccessType,
)

__all__ = [
    "MIN_MEMORY_BYTES",
    "ArtifactOut",
    "CellIn",
    "ExecuteRequest",
    "ExecuteResponse",
    "LimitsIn",
    "RunRequest",
    "RunResponse",
    "SessionCreateIn",
    "SessionCreatedOut",
    "SessionFileOut",
    "SessionFilesOut",
    "SessionListOut",
    "SessionOut",
    "SkippedArtifactOut",
    "decode_code",
]

#: the smallest per-request memory limit (below it no interpreter starts; the kernel takes pages)
MIN_MEMORY_BYTES = 16 << 20
_PACKAGES_HELP = (
    "packages installed for this request only, within SANDBOX_PACKAGES (docs/packages.md): "
    "Python tabulate==0.9.0 (binary wheels only), Node.js is-number@7.0.0 (no install scripts)"
)
_SURROGATE = re.compile("[\ud800-\udfff]")


def _encodable(value: str, what: str) -> str:
    """``value`` if it is valid Unicode text (no lone surrogate, so it encodes as UTF-8)."""
    if (found := _SURROGATE.search(value)) is not None:
        raise ValueError(f"{what} holds a lone surrogate (U+{ord(found.group()):04X}) at index {found.start()}, "
                         "which is not valid Unicode text")
    return value


def _checked_env(value: dict[str, str]) -> dict[str, str]:
    """``value`` if every name and value can be an environment variable."""
    for key, item in value.items():
        if not key:
            raise ValueError("an environment variable name must not be empty")
        if "=" in key or "\0" in key:
            raise ValueError(f"environment variable name {key!r} must not contain '=' or NUL")
        if "\0" in item:
            raise ValueError(f"the value of environment variable {key!r} must not contain NUL")
        _encodable(key, f"environment variable name {key!r}")
        _encodable(item, f"the value of environment variable {key!r}")
    return value


def decode_code(code_b64: str) -> str:
    """base64 -> UTF-8 text; ValueError with a clear message otherwise."""
    try:
        raw = base64.b64decode(code_b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"code_b64 is not valid base64: {exc}") from exc
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"code_b64 does not decode to UTF-8 text: {exc}") from exc


class RunRequest(BaseModel):
    """RAGFlow's ``POST /run`` body."""

    model_config = ConfigDict(extra="ignore")

    code_b64: str = Field(description="base64 of the UTF-8 source, which defines main()")
    language: Language = Field(Language.PYTHON, description="python | nodejs (javascript is an alias)")
    arguments: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of main")

    @field_validator("code_b64")
    @classmethod
    def _valid_b64(cls, value: str) -> str:
        decode_code(value)
        return value

    @property
    def code(self) -> str:
        return decode_code(self.code_b64)


class ArtifactOut(BaseModel):
    name: str
    mime_type: str
    size: int
    content_b64: str


class SkippedArtifactOut(BaseModel):
    """A file under artifacts/ that is not in ``artifacts``, and why."""

    name: str
    reason: str


class RunResponse(BaseModel):
    """RAGFlow's ``/run`` answer (also for every failure of the user's program)."""

    status: Status
    stdout: str = ""
    stderr: str = ""
    exit_code: int = 0
    detail: str | None = None
    time_used_ms: float | None = None
    memory_used_kb: float | None = None
    resource_limit_type: ResourceLimitType | None = None
    unauthorized_access_type: UnauthorizedAccessType | None = None
    runtime_error_type: RuntimeErrorType | None = None
    artifacts: list[ArtifactOut] = Field(default_factory=list)
    result: dict[str, Any] | None = None

    @classmethod
    def from_result(cls, result: ExecutionResult) -> RunResponse:
        return cls.model_validate(wire.result_to_json(result))


class LimitsIn(BaseModel):
    """Per-request limits; each must be at most the server's (SANDBOX_TIMEOUT, ...)."""

    model_config = ConfigDict(extra="forbid")

    wall_time_s: float | None = Field(None, gt=0, le=86400, description="seconds, above 0")
    memory_bytes: int | None = Field(
        None, ge=MIN_MEMORY_BYTES, le=1 << 50, description=f"bytes, at least {MIN_MEMORY_BYTES} (16 MiB)"
    )
    output_bytes: int | None = Field(None, ge=1, le=1 << 40, description="bytes of stdout + stderr, at least 1")


class ExecuteRequest(BaseModel):
    """Native ``POST /v1/execute`` body: plain-text code and optional extras."""

    model_config = ConfigDict(extra="forbid")

    language: Language = Language.PYTHON
    code: str = Field(description="the source, which defines main()")
    arguments: dict[str, Any] = Field(default_factory=dict)
    stdin: str = Field("", description="text the program reads from sys.stdin (Python)")
    files: dict[str, str] = Field(default_factory=dict, description="extra input files: relative path -> base64")
    env: dict[str, str] = Field(default_factory=dict, description="extra environment variables")
    limits: LimitsIn | None = None
    packages: list[str] = Field(default_factory=list, max_length=32, description=_PACKAGES_HELP)
    egress: list[str] | None = Field(
        None,
        description="hosts this execution may reach through the egress proxy, each covered by the server's "
        "SANDBOX_EGRESS_ALLOW (a request may narrow it, never widen it); [] = no network; absent = the server's list",
    )

    @field_validator("code", "stdin")
    @classmethod
    def _valid_text(cls, value: str) -> str:
        return _encodable(value, "the text")

    @field_validator("env")
    @classmethod
    def _valid_env(cls, value: dict[str, str]) -> dict[str, str]:
        return _checked_env(value)

    @field_validator("files")
    @classmethod
    def _valid_files(cls, value: dict[str, str]) -> dict[str, str]:
        for name, content in value.items():
            _encodable(name, "a file name")
            if "\0" in name:
                raise ValueError(f"file name {name!r} must not contain NUL")
            normal = os.path.normpath(name) if name else ""
            if not name or name.startswith("/") or ".." in name.split("/") or normal in (".", "") or name.endswith("/"):
                raise ValueError(f"file name {name!r} must be a relative path of a file inside the workspace")
            if normal == "artifacts":
                raise ValueError("file name 'artifacts' is the directory where the program saves its artifacts")
            try:
                base64.b64decode(content, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise ValueError(f"file {name!r} is not valid base64") from exc
        normals = {os.path.normpath(name) for name in value}
        for normal in normals:
            parent = os.path.dirname(normal)
            while parent:
                if parent in normals:
                    raise ValueError(f"file {parent!r} is also a directory of file {normal!r}")
                parent = os.path.dirname(parent)
        return value


class ExecuteResponse(RunResponse):
    """Native answer: the /run fields plus typed usage figures."""

    cpu_time_ms: float | None = None
    backend: str | None = None
    artifacts_skipped: list[SkippedArtifactOut] = Field(
        default_factory=list, description="files under artifacts/ left out of artifacts (a cap, a type, a name), and why"
    )

    @classmethod
    def from_result(cls, result: ExecutionResult) -> ExecuteResponse:
        return cls.model_validate(wire.result_to_json(result, native=True))


# -- sessions ------------------------------------------------------------------------------


def _utc(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, UTC)


class SessionCreateIn(BaseModel):
    """``POST /v1/sessions`` body."""

    model_config = ConfigDict(extra="forbid")

    language: Language = Language.PYTHON
    limits: LimitsIn | None = Field(None, description="each cell's limits, as for /v1/execute")
    idle_timeout_s: int | None = Field(
        None, gt=0, le=86400, description="seconds without a call before the session ends (at most the server's)"
    )
    env: dict[str, str] = Field(default_factory=dict, description="extra environment variables")
    packages: list[str] = Field(default_factory=list, max_length=32, description=_PACKAGES_HELP)

    @field_validator("env")
    @classmethod
    def _valid_env(cls, value: dict[str, str]) -> dict[str, str]:
        return _checked_env(value)

    def to_request(self, limits: Limits | None) -> SessionRequest:
        return SessionRequest(
            language=self.language, limits=limits, idle_timeout_s=self.idle_timeout_s, env=self.env,
            packages=tuple(self.packages),
        )


class CellIn(BaseModel):
    """``POST /v1/sessions/{id}/execute`` body: one cell."""

    model_config = ConfigDict(extra="forbid")

    code: str = Field(description="the cell; names of earlier cells are visible, no main() needed")
    stdin: str = Field("", description="text the cell reads from sys.stdin (Python)")
    timeout_s: float | None = Field(None, gt=0, le=86400, description="seconds, at most the session's wall time limit")

    @field_validator("code", "stdin")
    @classmethod
    def _valid_text(cls, value: str) -> str:
        return _encodable(value, "the text")

    def to_request(self) -> CellRequest:
        return CellRequest(code=self.code, stdin=self.stdin, timeout_s=self.timeout_s)


class SessionCreatedOut(BaseModel):
    """A new session (times in ISO 8601, UTC)."""

    id: str
    language: Language
    created_at: datetime
    expires_at: datetime
    idle_timeout_s: float
    backend: str

    @classmethod
    def from_info(cls, info: SessionInfo) -> SessionCreatedOut:
        return cls(
            id=info.id, language=info.language, created_at=_utc(info.created_at), expires_at=_utc(info.expires_at),
            idle_timeout_s=info.idle_timeout_s, backend=info.backend,
        )


class SessionOut(SessionCreatedOut):
    """A live session's description."""

    executions: int
    last_used_at: datetime

    @classmethod
    def from_info(cls, info: SessionInfo) -> SessionOut:
        created = SessionCreatedOut.from_info(info)
        return cls(**created.model_dump(), executions=info.executions, last_used_at=_utc(info.last_used_at))


class SessionListOut(BaseModel):
    sessions: list[SessionOut]


class SessionFileOut(BaseModel):
    """A file in a session's workspace: its path relative to the workspace, its size in bytes."""

    path: str
    size: int

    @classmethod
    def from_file(cls, file: SessionFile) -> SessionFileOut:
        return cls(path=file.path, size=file.size)


class SessionFilesOut(BaseModel):
    files: list[SessionFileOut]
