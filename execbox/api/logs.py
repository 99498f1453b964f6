"""One JSON log format for everything the service writes, and a request id per request.

* :data:`LOG_CONFIG` (via :func:`log_config`) is the ``logging.config`` dict that
  ``execbox serve`` applies and passes to uvicorn, so uvicorn's error and access lines,
  execbox's own and any library's are one JSON object per line on stderr (python-json-logger's
  formatter, plus the request id).
* :class:`RequestID` (ASGI middleware) takes a sane ``X-Request-ID`` from the client or
  makes one, returns it in the ``X-Request-ID`` header of the answer, and holds it in
  :data:`REQUEST_ID` while the request runs, so that every line logged for that request
  carries it (``request_id``).

What is logged is execbox's choice, never the request's content: no code, no output, no
keys (see docs/operations.md).
"""

from __future__ import annotations

import logging
import re
import uuid
from contextvars import ContextVar
from typing import Any

from pythonjsonlogger.json import JsonFormatter
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["REQUEST_ID", "REQUEST_ID_HEADER", "JSONLogFormatter", "RequestID", "RequestIDFilter", "log_config"]

REQUEST_ID: ContextVar[str | None] = ContextVar("execbox_request_id", default=None)
REQUEST_ID_HEADER = "X-Request-ID"
#: an id a client may choose: short, and only characters that cannot forge a log line
_SANE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class RequestIDFilter(logging.Filter):
    """Adds ``request_id`` to every record logged while a request runs."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = REQUEST_ID.get()
        if request_id is not None and not hasattr(record, "request_id"):
            record.request_id = request_id
        return True


_FIRST = ("time", "level", "logger", "message", "request_id")


class JSONLogFormatter(JsonFormatter):
    """``{"time", "level", "logger", "message", ...}``: time in ISO 8601 UTC; the fields a
    record carries as ``extra`` become keys; a record with a ``summary`` extra has it as its
    message (so a line whose text repeats its fields as JSON is not encoded twice)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(
            "{levelname}{name}{message}", style="{", timestamp="time", json_ensure_ascii=False,
            rename_fields={"levelname": "level", "name": "logger", "exc_info": "exception"},
        )

    def add_fields(self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]) -> None:
        super().add_fields(log_data, record, message_dict)
        log_data.pop("color_message", None)  # uvicorn's copy of the message with terminal colours
        summary = log_data.pop("summary", None)
        if isinstance(summary, str):
            log_data["message"] = summary
        rest = {key: log_data.pop(key) for key in list(log_data) if key not in _FIRST}
        ordered = {key: log_data.pop(key) for key in _FIRST if key in log_data}
        log_data.update(ordered)
        log_data.update(rest)


def log_config(level: str = "info") -> dict[str, Any]:
    """The logging configuration of the service: everything as JSON on stderr at ``level``."""
    upper = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request_id": {"()": RequestIDFilter}},
        "formatters": {"json": {"()": JSONLogFormatter}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler", "stream": "ext://sys.stderr", "formatter": "json",
                "filters": ["request_id"],
            }
        },
        "root": {"handlers": ["stderr"], "level": upper},
        "loggers": {
            name: {"handlers": [], "level": upper, "propagate": True}
            for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "execbox")
        },
    }


class RequestID:
    """ASGI middleware: one request id per request (see the module docstring)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = Headers(scope=scope).get(REQUEST_ID_HEADER)
        request_id = given if given is not None and _SANE_ID.fullmatch(given) else uuid.uuid4().hex

        async def with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        token = REQUEST_ID.set(request_id)
        try:
            await self.app(scope, receive, with_id)
        finally:
            REQUEST_ID.reset(token)
