"""Host side of the driver protocol (see ``execbox.runtimes.base``): framing and parsing."""

from __future__ import annotations

import base64
import json
from typing import Any

from execbox.errors import SandboxProtocolError
from execbox.isolation.base import DriverReport
from execbox.models import ExecutionRequest

__all__ = ["FrameReader", "encode_request", "parse_report"]

_MAX_FRAME_BYTES = 64 << 20


def _frame(message: dict[str, Any]) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode()
    return len(body).to_bytes(4, "big") + body


def encode_request(request: ExecutionRequest) -> bytes:
    """The one request frame the driver reads on its control channel."""
    return _frame(
        {
            "code": request.code,
            "arguments": request.arguments,
            "stdin": request.stdin,
            "files": {name: base64.b64encode(data).decode() for name, data in request.files.items()},
            "env": request.env,
        }
    )


class FrameReader:
    """Incremental parser of length-prefixed JSON frames from the driver."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self._buffer += data
        messages = []
        while len(self._buffer) >= 4:
            size = int.from_bytes(self._buffer[:4], "big")
            if size > _MAX_FRAME_BYTES:
                raise SandboxProtocolError(f"driver sent a frame of {size} bytes")
            if len(self._buffer) < 4 + size:
                break
            body = bytes(self._buffer[4 : 4 + size])
            del self._buffer[: 4 + size]
            try:
                message = json.loads(body)
            except ValueError as exc:
                raise SandboxProtocolError(f"driver sent a frame that is not JSON: {exc}") from exc
            if not isinstance(message, dict):
                raise SandboxProtocolError("driver sent a frame that is not a JSON object")
            messages.append(message)
        return messages


def parse_report(message: dict[str, Any]) -> DriverReport:
    """Turn the driver's ``done`` event into a DriverReport, checking its shape."""
    try:
        exit_code = int(message["exit_code"])
        result = message.get("result")
        if result is not None and not (isinstance(result, dict) and "value" in result):
            raise ValueError("result must be an object with a value")
        kind = message.get("error_kind")
        if kind not in (None, "memory", "network", "file"):
            raise ValueError(f"unknown error_kind {kind!r}")
        time_ms = message.get("time_ms")
        return DriverReport(exit_code, result, kind, float(time_ms) if time_ms is not None else None)
    except (KeyError, TypeError, ValueError) as exc:
        raise SandboxProtocolError(f"driver sent a malformed report: {exc}") from exc
