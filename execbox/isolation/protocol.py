"""Host side of the driver protocol (see ``execbox.runtimes.base``): framing and parsing.

The driver's report is untrusted input: it comes from inside the sandbox, from the same
process as the user's code. :func:`parse_report` accepts only a report of the exact
shape (exit code 0..255 as an integer, a result object with ``present`` and ``value``,
a known ``error_kind``, a finite non-negative ``time_ms``); anything else is a
:class:`~execbox.errors.SandboxProtocolError`, which the supervisor turns into a verdict
about the program, never into ``internal_error``. A report also carries the per-run
``token`` the host sent with the request (see :func:`encode_request`): a frame without it
was not written by the driver and is not believed.
"""

from __future__ import annotations

import base64
import json
import math
from typing import Any

from execbox.errors import SandboxProtocolError
from execbox.isolation.base import DriverReport
from execbox.models import ExecutionRequest
from execbox.runtimes.base import EGRESS_DIR, EGRESS_PORT, EGRESS_SOCKET_NAME

__all__ = ["FrameReader", "encode_request", "parse_report"]

_MAX_FRAME_BYTES = 64 << 20


def _frame(message: dict[str, Any]) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode()
    return len(body).to_bytes(4, "big") + body


#: the largest time a report may claim (a day); beyond it the report is malformed
_MAX_TIME_MS = 86_400_000.0
_ERROR_KINDS = (None, "memory", "network", "file", "result", "time")
_RESULT_TYPES = ("json", "text")


def encode_request(request: ExecutionRequest, token: str | None = None, cell_timeout_s: float | None = None) -> bytes:
    """The one request frame the driver reads on its control channel; with ``token``, the
    driver must return it in its report (and keeps it out of the user's reach by name);
    with egress rules, ``egress`` says where the driver's bridge listens and connects.

    With ``cell_timeout_s`` the frame is a session cell: the driver runs the code in its
    one persistent interpreter (no ``main``), interrupts it after that many seconds
    (reporting ``error_kind: "time"``) and then waits for the next cell."""
    message: dict[str, Any] = {
        "code": request.code,
        "arguments": request.arguments,
        "stdin": request.stdin,
        "files": {name: base64.b64encode(data).decode() for name, data in request.files.items()},
        "env": request.env,
    }
    if request.egress:  # the driver bridges this loopback port to the proxy's socket
        message["egress"] = {"port": EGRESS_PORT, "socket": f"{EGRESS_DIR}/{EGRESS_SOCKET_NAME}"}
    if token is not None:
        message["token"] = token
    if cell_timeout_s is not None:
        message["cell"] = {"timeout_s": cell_timeout_s}
    return _frame(message)


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
            except (ValueError, RecursionError) as exc:
                raise SandboxProtocolError(f"driver sent a frame that is not JSON: {exc}") from exc
            if not isinstance(message, dict):
                raise SandboxProtocolError("driver sent a frame that is not a JSON object")
            messages.append(message)
        return messages


def parse_report(message: dict[str, Any]) -> DriverReport:
    """Turn the driver's ``done`` event into a DriverReport, checking its shape strictly."""
    try:
        if message.get("event", "done") != "done":
            raise ValueError(f"event {message.get('event')!r} is not done")
        exit_code = message["exit_code"]
        if type(exit_code) is not int or not 0 <= exit_code <= 255:
            raise ValueError(f"exit_code {exit_code!r} is not an integer 0..255")
        result = message.get("result")
        if result is not None:
            if not (isinstance(result, dict) and "value" in result and isinstance(result.get("present", True), bool)):
                raise ValueError("result must be an object with a value")
            if result.get("type", "json") not in _RESULT_TYPES:
                raise ValueError(f"result type {result.get('type')!r} is not json or text")
            if result.get("type") == "text" and not isinstance(result["value"], str):
                raise ValueError("a text result must be a string")
            if exit_code != 0:
                raise ValueError("a failed program has no result")
        kind = message.get("error_kind")
        if kind not in _ERROR_KINDS:
            raise ValueError(f"unknown error_kind {kind!r}")
        if kind is not None and exit_code == 0:
            raise ValueError("a program that succeeded has no error_kind")
        time_ms = message.get("time_ms")
        if time_ms is not None:
            if type(time_ms) not in (int, float) or not math.isfinite(time_ms) or not 0 <= time_ms <= _MAX_TIME_MS:
                raise ValueError(f"time_ms {time_ms!r} is not a duration in milliseconds")
            time_ms = float(time_ms)
        return DriverReport(exit_code, result, kind, time_ms)
    except (KeyError, TypeError, ValueError) as exc:
        raise SandboxProtocolError(f"driver sent a malformed report: {exc}") from exc
