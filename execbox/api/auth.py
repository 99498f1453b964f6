"""API keys at the door: an ASGI middleware in front of every route and mount.

With keys on (``SANDBOX_API_KEYS_FILE`` or ``SANDBOX_API_KEYS``), a request needs
``Authorization: Bearer <key>`` or ``X-API-Key: <key>``, except on the open paths (health,
liveness, metrics, and the documentation pages); a missing, wrong or revoked key is
answered ``401`` with ``WWW-Authenticate: Bearer`` before the body is read. ``/run`` takes
requests without a key when ``SANDBOX_RUN_WITHOUT_KEY=true`` (a key it is sent must still
be right). The caller's key name is put in the request's state (``caller``), where
:func:`execbox.api.deps.get_caller` reads it.

A middleware rather than a dependency: it guards what is mounted as a plain ASGI app
(``/mcp``) as well as the routes, and a route added later is guarded unless it is named
open here (fail closed). Keys are never logged; the lookup is constant-time
(:class:`execbox.service.apikeys.KeyStore`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Receive, Scope, Send

from execbox.service.apikeys import KeyStore

__all__ = ["CALLER_STATE", "OPEN_PATHS", "KeyAuth", "caller_name", "presented_key"]

log = logging.getLogger("execbox.api")

#: the paths every caller may use, key or not (orchestrators and scrapers send none)
OPEN_PATHS = frozenset({"/", "/healthz", "/livez", "/metrics"})
#: the documentation pages and what they load (the schema holds no secret)
OPEN_PREFIXES = ("/docs", "/redoc", "/openapi.json")
#: where the caller's key name goes in the ASGI scope's state
CALLER_STATE = "caller"
RUN_PATH = "/run"
_NEEDED = "an API key is needed: send Authorization: Bearer <key> or X-API-Key: <key>"
_WRONG = "the API key is not valid"


def presented_key(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The key a request carries: ``Authorization: Bearer`` (any case), else ``X-API-Key``."""
    bearer = api_key = None
    for name, value in headers:
        if name == b"authorization" and bearer is None:
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                bearer = token.strip()
        elif name == b"x-api-key" and api_key is None:
            api_key = value.decode("latin-1").strip() or None
    return bearer or api_key


def caller_name(request: HTTPConnection | None) -> str | None:
    """The name of the key a request came in with; None without keys, or for /run without one."""
    if request is None:
        return None
    name = request.scope.get("state", {}).get(CALLER_STATE)
    return name if isinstance(name, str) else None


class KeyAuth:
    """Refuses requests without a valid key (see the module docstring); ``on_refused`` is
    called once per refusal (a metric)."""

    def __init__(self, app: ASGIApp, keys: KeyStore, run_without_key: bool = False,
                 on_refused: Callable[[], None] | None = None) -> None:
        self.app = app
        self.keys = keys
        self.run_without_key = run_without_key
        self.on_refused = on_refused

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
            await self.app(scope, receive, send)
            return
        key = presented_key(scope["headers"])
        name = self.keys.lookup(key) if key is not None else None
        if name is None and not (key is None and path == RUN_PATH and self.run_without_key):
            log.info("refused %s %s: %s", scope["method"], path, "a wrong API key" if key else "no API key")
            if self.on_refused is not None:
                self.on_refused()
            await _unauthorized(send, _WRONG if key else _NEEDED)
            return
        scope.setdefault("state", {})[CALLER_STATE] = name
        await self.app(scope, receive, send)


async def _unauthorized(send: Send, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({
        "type": "http.response.start",
        "status": 401,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"www-authenticate", b"Bearer"),
        ],
    })
    await send({"type": "http.response.body", "body": body})
