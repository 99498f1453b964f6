"""How the service reads request bodies: strictly, and within a time limit.

* :class:`StrictJSONRoute` parses JSON bodies with :func:`parse_json_body`, so that every
  body that is not acceptable JSON is FastAPI's own 422 ``json_invalid`` (FastAPI answers
  400 to what ``json.loads`` raises besides JSONDecodeError: invalid UTF-8, deep nesting,
  huge integers), with the reason in the message.
* :class:`BodyTimeout` bounds the time a body may take to arrive. Hand-written because
  neither uvicorn (a keep-alive timeout, none for a body) nor Starlette has one.

The size limit is FastAPI's own ``max_body_size`` (see ``create_app``).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import HTTPException, Request, Response
from fastapi.routing import APIRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from execbox.wire import MAX_RESULT_DEPTH

__all__ = ["BodyTimeout", "StrictJSONRoute", "parse_json_body"]


class BodyTimeout:
    """ASGI middleware: 408 (and the connection closed) when a request body does not arrive
    in full within ``timeout_s`` of its first read: a slow body, or one shorter than its
    Content-Length, would otherwise hold the connection open for ever (uvicorn has a
    keep-alive timeout but none for a body). After the body, ``receive`` is passed through
    untouched (a streaming answer listens on it for the client's disconnect)."""

    def __init__(self, app: ASGIApp, timeout_s: float) -> None:
        self.app = app
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        deadline: float | None = None
        complete = False

        async def timed() -> Message:
            nonlocal deadline, complete
            if complete:
                return await receive()
            loop = asyncio.get_running_loop()
            if deadline is None:
                deadline = loop.time() + self.timeout_s
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                raise HTTPException(
                    408, f"request body not received in full within {self.timeout_s:g}s (SANDBOX_BODY_TIMEOUT)",
                    headers={"Connection": "close"},
                ) from None
            complete = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        await self.app(scope, timed, send)


class _StrictJSONRequest(Request):
    """A request whose JSON body is parsed strictly (see :func:`parse_json_body`)."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = parse_json_body(await self.body())
        return self._json


class StrictJSONRoute(APIRoute):
    """Routes whose bodies go through :class:`_StrictJSONRequest`: every undecodable body
    is FastAPI's 422 ``json_invalid`` (FastAPI answers 400 to what ``json.loads`` raises
    besides JSONDecodeError: invalid UTF-8, deep nesting, huge integers)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict(request: Request) -> Response:
            return await handler(_StrictJSONRequest(request.scope, request.receive))

        return strict


def _refuse(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


def parse_json_body(raw: bytes) -> Any:
    """JSON from a request body; json.JSONDecodeError (a 422) for invalid UTF-8, NaN or
    Infinity, nesting deeper than wire.MAX_RESULT_DEPTH, integers of more than 4300 digits."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise json.JSONDecodeError(f"the body is not UTF-8 (byte {exc.start})", raw.decode("utf-8", "replace"), exc.start) from exc
    try:
        value = json.loads(text, parse_constant=_refuse)
    except json.JSONDecodeError:
        raise
    except RecursionError as exc:
        raise json.JSONDecodeError(f"nested deeper than {MAX_RESULT_DEPTH} levels", text, 0) from exc
    except ValueError as exc:  # an integer beyond Python's 4300-digit conversion limit, NaN, Infinity
        raise json.JSONDecodeError(str(exc), text, 0) from exc
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > MAX_RESULT_DEPTH:
                raise json.JSONDecodeError(f"nested deeper than {MAX_RESULT_DEPTH} levels", text, 0)
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return value
