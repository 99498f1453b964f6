"""Wire models of the HTTP API: RAGFlow's /run contract and the native /v1 API."""

from __future__ import annotations

import base64
import binascii
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from execbox.models import (
    ExecutionResult,
    Language,
    ResourceLimitType,
    RuntimeErrorType,
    Status,
    UnauthorizedAccessType,
)

__all__ = ["ArtifactOut", "ExecuteRequest", "ExecuteResponse", "LimitsIn", "RunRequest", "RunResponse", "decode_code"]


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
        data = result.model_dump(include=set(cls.model_fields) - {"artifacts"})
        data["artifacts"] = [
            ArtifactOut(name=a.name, mime_type=a.mime_type, size=a.size, content_b64=a.content_b64)
            for a in result.artifacts
        ]
        return cls(**data)


class LimitsIn(BaseModel):
    """Per-request limits; each must be at most the server's (SANDBOX_TIMEOUT, ...)."""

    model_config = ConfigDict(extra="forbid")

    wall_time_s: float | None = Field(None, gt=0)
    memory_bytes: int | None = Field(None, gt=0)
    output_bytes: int | None = Field(None, gt=0)


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

    @field_validator("files")
    @classmethod
    def _valid_files(cls, value: dict[str, str]) -> dict[str, str]:
        for name, content in value.items():
            if not name or name.startswith("/") or ".." in name.split("/"):
                raise ValueError(f"file name {name!r} must be a relative path inside the workspace")
            try:
                base64.b64decode(content, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise ValueError(f"file {name!r} is not valid base64") from exc
        return value


class ExecuteResponse(RunResponse):
    """Native answer: the /run fields plus typed usage figures."""

    cpu_time_ms: float | None = None
    backend: str | None = None

    @classmethod
    def from_result(cls, result: ExecutionResult) -> ExecuteResponse:
        base = RunResponse.from_result(result).model_dump()
        return cls(**base, cpu_time_ms=result.cpu_time_ms, backend=result.backend)
