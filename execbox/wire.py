"""The wire contract, written once: exit codes, result <-> JSON, artifact encoding.

Used by the API (``execbox.api``), the CLI and the client, so that the three say the same
thing in the same words. Everything here is pure data handling (no I/O).

Serialisation never fails on what a program can return:

* a lone surrogate (Python ``"\\ud800"``, a JavaScript string cut in the middle of a pair)
  is **replaced** by U+FFFD, the replacement character, as undecodable bytes of stdout are;
* ``NaN``, ``Infinity`` and ``-Infinity`` become ``null`` (what JavaScript's
  ``JSON.stringify`` and pandas' ``to_json`` do);
* a value nested deeper than :data:`MAX_RESULT_DEPTH` or larger than
  :data:`MAX_RESULT_BYTES` once encoded is refused with :class:`ResultRefused`; the
  verdict is then ``program_error`` with detail ``invalid_result`` and the reason in stderr.
"""

from __future__ import annotations

import base64
import json
import math
import re
from typing import Any

from execbox.models import (
    Artifact,
    ExecutionResult,
    ResultValue,
    SkippedArtifact,
)

__all__ = [
    "EXIT_BUSY",
    "EXIT_INTERNAL",
    "EXIT_OOM",
    "EXIT_OUTPUT",
    "EXIT_RATE_LIMITED",
    "EXIT_TIMEOUT",
    "EXIT_UNSAFE",
    "MAX_RESULT_BYTES",
    "MAX_RESULT_DEPTH",
    "NATIVE_FIELDS",
    "RESERVED_EXIT_CODES",
    "RUN_FIELDS",
    "ResultRefused",
    "artifact_from_json",
    "artifact_to_json",
    "checked_result_value",
    "clean_text",
    "dumps",
    "json_value",
    "result_from_json",
    "result_to_json",
]

EXIT_TIMEOUT = -124
EXIT_OOM = -137
EXIT_OUTPUT = -125
EXIT_UNSAFE = -999
EXIT_BUSY = -10
EXIT_RATE_LIMITED = -429
EXIT_INTERNAL = -3
#: exit codes only the host gives; a program's own exit status is 0..255 or minus a signal
RESERVED_EXIT_CODES = frozenset({EXIT_TIMEOUT, EXIT_OOM, EXIT_OUTPUT, EXIT_UNSAFE, EXIT_BUSY, EXIT_RATE_LIMITED, EXIT_INTERNAL})

#: deepest nesting of lists/objects accepted in a result (and in a request body)
MAX_RESULT_DEPTH = 100
#: largest result value, once encoded as JSON
MAX_RESULT_BYTES = 16 << 20

#: the fields of RAGFlow's ``/run`` answer, in its order
RUN_FIELDS = (
    "status", "stdout", "stderr", "exit_code", "detail", "time_used_ms", "memory_used_kb",
    "resource_limit_type", "unauthorized_access_type", "runtime_error_type", "artifacts", "result",
)  # fmt: skip
#: the native ``/v1`` answer: the /run fields and these
NATIVE_FIELDS = (*RUN_FIELDS, "cpu_time_ms", "backend", "artifacts_skipped")

_SURROGATE = re.compile("[\ud800-\udfff]")


class ResultRefused(ValueError):
    """A value cannot be carried as a result (too deep, too large); the message says why."""


def clean_text(text: str) -> str:
    """``text`` with every lone surrogate replaced by U+FFFD (always encodable as UTF-8)."""
    return _SURROGATE.sub("\ufffd", text) if _SURROGATE.search(text) else text


_RAISE = object()


def json_value(value: Any, max_depth: int = MAX_RESULT_DEPTH, replacement: Any = _RAISE) -> Any:
    """A copy of a JSON-like value that always encodes: strings cleaned, NaN/inf -> None,
    non-string keys as strings, tuples as lists. Raises ResultRefused beyond ``max_depth``
    or for a type JSON has no form for, unless a ``replacement`` value is given for those."""

    def walk(item: Any, depth: int) -> Any:
        if item is None or isinstance(item, bool | int):
            return item
        if isinstance(item, float):
            return item if math.isfinite(item) else None
        if isinstance(item, str):
            return clean_text(item)
        if depth >= max_depth:
            if replacement is not _RAISE:
                return replacement
            raise ResultRefused(f"the value is nested deeper than {max_depth} levels")
        if isinstance(item, dict):
            return {clean_text(str(k)): walk(v, depth + 1) for k, v in item.items()}
        if isinstance(item, list | tuple):
            return [walk(v, depth + 1) for v in item]
        if replacement is not _RAISE:
            return replacement
        raise ResultRefused(f"a value of type {type(item).__name__} has no JSON form")

    return walk(value, 0)


def checked_result_value(value: Any) -> Any:
    """A result value made safe (see :func:`json_value`) and within MAX_RESULT_BYTES."""
    safe = json_value(value)
    size = len(json.dumps(safe, ensure_ascii=False, allow_nan=False).encode())
    if size > MAX_RESULT_BYTES:
        raise ResultRefused(f"the value is {size} bytes as JSON, more than {MAX_RESULT_BYTES}")
    return safe


def dumps(data: Any) -> str:
    """Compact JSON that never fails on cleaned-up data (and cleans it if it must)."""
    try:
        text = json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        text.encode("utf-8")
        return text
    except (ValueError, TypeError, UnicodeEncodeError, RecursionError):
        safe = json_value(data, max_depth=MAX_RESULT_DEPTH + 16, replacement=None)
        return json.dumps(safe, ensure_ascii=False, separators=(",", ":"))


def artifact_to_json(artifact: Artifact) -> dict[str, Any]:
    return {
        "name": clean_text(artifact.name),
        "mime_type": artifact.mime_type,
        "size": artifact.size,
        "content_b64": artifact.content_b64,
    }


def artifact_from_json(data: dict[str, Any]) -> Artifact:
    return Artifact(
        name=data["name"], mime_type=data["mime_type"], size=data["size"], content=base64.b64decode(data["content_b64"])
    )


def result_to_json(result: ExecutionResult, *, native: bool = False) -> dict[str, Any]:
    """The answer of ``/run`` (RAGFlow's fields only) or, with ``native``, of ``/v1``."""
    value = None
    if result.result is not None:
        value = {
            "present": result.result.present,
            "value": json_value(result.result.value, max_depth=MAX_RESULT_DEPTH + 1, replacement=None),
            "type": result.result.type,
        }
    data: dict[str, Any] = {
        "status": result.status.value,
        "stdout": clean_text(result.stdout),
        "stderr": clean_text(result.stderr),
        "exit_code": result.exit_code,
        "detail": clean_text(result.detail) if result.detail is not None else None,
        "time_used_ms": result.time_used_ms,
        "memory_used_kb": result.memory_used_kb,
        "resource_limit_type": result.resource_limit_type.value if result.resource_limit_type else None,
        "unauthorized_access_type": result.unauthorized_access_type.value if result.unauthorized_access_type else None,
        "runtime_error_type": result.runtime_error_type.value if result.runtime_error_type else None,
        "artifacts": [artifact_to_json(a) for a in result.artifacts],
        "result": value,
    }
    if native:
        data["cpu_time_ms"] = result.cpu_time_ms
        data["backend"] = result.backend
        data["artifacts_skipped"] = [
            {"name": clean_text(s.name), "reason": s.reason} for s in result.artifacts_skipped
        ]
    return data


def result_from_json(data: dict[str, Any]) -> ExecutionResult:
    """An answer of ``/run`` or ``/v1`` back into an ExecutionResult (unknown fields ignored)."""
    artifacts = tuple(artifact_from_json(a) for a in data.get("artifacts") or ())
    skipped = tuple(SkippedArtifact(**s) for s in data.get("artifacts_skipped") or ())
    result = ResultValue(**data["result"]) if data.get("result") else None
    known = set(ExecutionResult.model_fields) - {"artifacts", "artifacts_skipped", "result"}
    return ExecutionResult(
        artifacts=artifacts, artifacts_skipped=skipped, result=result, **{k: v for k, v in data.items() if k in known}
    )
