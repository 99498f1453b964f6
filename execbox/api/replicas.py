"""Session pinning across replicas: a call for another replica's session is proxied to it.

A session lives in the memory of the replica that created it. Its id says which replica
that is: ``<replica>.<32 hex>`` when the service has a replica name (``SANDBOX_REPLICA_NAME``,
on Kubernetes the pod's name), a plain ``<32 hex>`` otherwise. :class:`ReplicaForwarder`
is an ASGI middleware in front of the app: a ``/v1/sessions/{id}...`` call whose id names
another replica is sent on to that replica, whose answer comes back unchanged; every other
call (the replica's own sessions, ids without a replica, ``POST /v1/sessions``, everything
outside ``/v1/sessions/{id}``) goes to the app untouched.

Why a proxy and not a redirect: a ``307`` would need every client to follow redirects on
``POST``/``PUT`` with the body again (many do not, or drop the body), and to reach every
replica's own address; a proxy is transparent to any client, costs one hop inside the
cluster, and keeps the replicas' addresses private. An ingress that hashes on a key the
client always sends avoids most hops (docs/kubernetes.md).

Where a replica is: ``SANDBOX_REPLICA_PEERS`` (``name=url,...``) first, then
``SANDBOX_REPLICA_URL_TEMPLATE`` with ``{replica}`` replaced (on Kubernetes a headless
Service gives each pod a DNS name: ``http://{replica}.execbox-peers:9385``). Only a name of
the form of SANDBOX_REPLICA_NAME (letters, digits, ``-`` and ``.``) is put into the
template, so an id cannot change its scheme, port or path, nor leave the domain the
template puts the name under.

What holds:

* a replica that cannot be reached (connection refused, a name that does not resolve, no
  answer within the connect timeout, or no address for it) means that its sessions are
  gone: ``404 {"detail": ...}``, as for any unknown session;
* the body goes on as it arrives and the answer comes back as it is produced (raw file
  bodies, server-sent events), with its status and headers; hop-by-hop headers
  (RFC 9110 section 7.6.1, and any the ``Connection`` header names) are not passed on;
* a forwarded request carries ``X-Execbox-Forwarded-By: <this replica>``, and a request
  that carries it is never forwarded again (a stale address cannot make a loop): it is
  answered where it lands;
* a client that goes away closes the forwarded request, so that the owner stops the cell
  (it watches its own client, as for every call);
* authentication and quotas are the owner's: it sees the client's headers as they were,
  and counts the call once.

Hand-written because it is a few dozen lines over httpx (already a dependency), and the
reverse proxies for ASGI on PyPI are unmaintained or pull in a framework of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import AsyncIterator, Mapping
from typing import Any

import httpx
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from execbox.settings import REPLICA_NAME_PATTERN, Settings

__all__ = [
    "FORWARDED_BY_HEADER",
    "ReplicaForwarder",
    "foreign_session_url",
    "forwarder_options",
    "session_replica",
]

log = logging.getLogger("execbox.api.replicas")

#: set on every forwarded request; a request that has it is never forwarded again
FORWARDED_BY_HEADER = "x-execbox-forwarded-by"
#: how long to wait for a replica to accept a connection before its sessions count as gone
CONNECT_TIMEOUT_S = 3.0
_SESSION_PATH = re.compile(r"^/v1/sessions/(?P<id>[^/]+)(?:/.*)?$")
_SESSION_TOKEN = re.compile(r"[0-9a-f]{32}")
#: RFC 9110 7.6.1, plus what must not cross a proxy here (Host is the upstream's own;
#: Expect: 100-continue is answered by the server in front; Date and Server are set by it)
_REQUEST_DROPPED = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection", "te",
     "trailer", "transfer-encoding", "upgrade", "host", "expect"}
)
_RESPONSE_DROPPED = (_REQUEST_DROPPED - {"host", "expect"}) | {"date", "server"}


def session_replica(session_id: str) -> str | None:
    """The replica a session id names (``"execbox-7d9f-x2k4q.<32 hex>"`` ->
    ``"execbox-7d9f-x2k4q"``, as execbox.service.sessions.replica_of); None for an id
    without one, or not of that form."""
    replica, dot, token = session_id.rpartition(".")
    if not dot or not _SESSION_TOKEN.fullmatch(token) or not REPLICA_NAME_PATTERN.fullmatch(replica):
        return None
    return replica


def forwarder_options(settings: Settings) -> dict[str, Any]:
    """The keyword arguments of :class:`ReplicaForwarder` from the settings:
    ``app.add_middleware(ReplicaForwarder, **forwarder_options(settings))``."""
    return {
        "replica_name": settings.replica_name or None,
        "peers": settings.replica_peer_urls,
        "url_template": settings.replica_url_template or None,
    }


def _replica_url(replica: str, peers: Mapping[str, str], url_template: str | None) -> str | None:
    if replica in peers:
        return peers[replica].rstrip("/")
    if url_template and REPLICA_NAME_PATTERN.fullmatch(replica):
        return url_template.replace("{replica}", replica).rstrip("/")
    return None


def foreign_session_url(settings: Settings, session_id: str) -> str | None:
    """The base URL of the replica that owns ``session_id`` when that is another replica
    (for calls that carry the id in their body, such as MCP's session tools); None when the
    session is this replica's, or its id names no replica; ``""`` when it names one that
    nothing says where it is (its sessions count as gone)."""
    replica = session_replica(session_id)
    if replica is None or replica == (settings.replica_name or None):
        return None
    return _replica_url(replica, settings.replica_peer_urls, settings.replica_url_template or None) or ""


class _ClientGone(Exception):
    """The client disconnected while its request was being forwarded."""


class ReplicaForwarder:
    """ASGI middleware: calls for another replica's session are proxied to that replica
    (see the module docstring). ``transport`` replaces httpx's network transport (tests)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        replica_name: str | None,
        peers: Mapping[str, str] | None = None,
        url_template: str | None = None,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.app = app
        self.replica_name = replica_name
        self.peers = {name: url.rstrip("/") for name, url in (peers or {}).items()}
        self.url_template = url_template
        self._timeout = httpx.Timeout(None, connect=connect_timeout_s)
        self._transport = transport
        self._client: httpx.AsyncClient | None = None

    def replica_url(self, replica: str) -> str | None:
        """The base URL of ``replica``, or None when nothing says where it is."""
        return _replica_url(replica, self.peers, self.url_template)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, self._closing_on_shutdown(receive), send)
            return
        owner = self._foreign_owner(scope)
        if owner is None:
            await self.app(scope, receive, send)
            return
        session_id = _SESSION_PATH.match(scope["path"]).group("id")  # type: ignore[union-attr]
        base_url = self.replica_url(owner)
        if base_url is None:
            await _not_found(send, session_id, owner, "no SANDBOX_REPLICA_PEERS entry or SANDBOX_REPLICA_URL_TEMPLATE says where it is")
            return
        await self._forward(scope, receive, send, session_id, owner, base_url)

    def _foreign_owner(self, scope: Scope) -> str | None:
        """The replica to forward this request to, or None to answer it here."""
        if scope["type"] != "http":
            return None
        match = _SESSION_PATH.match(scope["path"])
        if match is None:
            return None
        owner = session_replica(match.group("id"))
        if owner is None or owner == self.replica_name:
            return None
        if any(name.lower() == FORWARDED_BY_HEADER.encode() for name, _ in scope["headers"]):
            return None  # forwarded once already: never again
        return owner

    def _closing_on_shutdown(self, receive: Receive) -> Receive:
        async def wrapped() -> Message:
            message = await receive()
            if message["type"] == "lifespan.shutdown" and self._client is not None:
                client, self._client = self._client, None
                await client.aclose()
            return message

        return wrapped

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                transport=self._transport,
                timeout=self._timeout,
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=32),
                follow_redirects=False,
                trust_env=False,  # a replica is never reached through an HTTP(S)_PROXY
            )
            for name in ("accept", "accept-encoding", "user-agent"):  # the client's own, or none
                del self._client.headers[name]
        return self._client

    def _upstream_request(self, scope: Scope, receive: Receive, base_url: str, body_sent: asyncio.Event) -> httpx.Request:
        headers = _without_hop_by_hop(scope["headers"], _REQUEST_DROPPED)
        client = scope.get("client")
        forwarded_for = [value for name, value in headers if name == b"x-forwarded-for"]
        headers = [(name, value) for name, value in headers if name not in (b"x-forwarded-for", b"x-forwarded-proto")]
        if client:
            forwarded_for.append(str(client[0]).encode())
        if forwarded_for:
            headers.append((b"x-forwarded-for", b", ".join(forwarded_for)))
        headers.append((b"x-forwarded-proto", scope.get("scheme", "http").encode()))
        headers.append((FORWARDED_BY_HEADER.encode(), (self.replica_name or "-").encode()))
        has_body = any(name in (b"content-length", b"transfer-encoding") for name, _ in scope["headers"])
        target = scope.get("raw_path") or scope["path"].encode()
        url = base_url + target.decode("latin-1")
        if scope.get("query_string"):
            url += "?" + scope["query_string"].decode("latin-1")
        if not has_body:
            body_sent.set()
        content = _request_body(receive, body_sent) if has_body else None
        return self._http().build_request(scope["method"], url, headers=headers, content=content)

    async def _forward(self, scope: Scope, receive: Receive, send: Send, session_id: str, owner: str, base_url: str) -> None:
        body_sent = asyncio.Event()
        request = self._upstream_request(scope, receive, base_url, body_sent)
        exchange = asyncio.ensure_future(self._exchange(request, send, session_id, owner))
        watcher = asyncio.ensure_future(_disconnected(receive, body_sent))
        try:
            await asyncio.wait({exchange, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (exchange, watcher):
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
        if exchange.cancelled() or isinstance(exchange.exception(), _ClientGone):
            log.info("client went away: closed its call forwarded to replica %s", owner)
            return
        exchange.result()

    async def _exchange(self, request: httpx.Request, send: Send, session_id: str, owner: str) -> None:
        try:
            response = await self._http().send(request, stream=True)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            log.warning("session %s: replica %s cannot be reached (%s): answering 404", session_id, owner, exc)
            await _not_found(send, session_id, owner, "it cannot be reached")
            return
        except httpx.TransportError as exc:
            log.warning("session %s: replica %s failed while answering (%r): answering 502", session_id, owner, exc)
            await _json(send, 502, f"session {session_id}: its replica {owner} failed while answering; try again")
            return
        try:
            await send({
                "type": "http.response.start",
                "status": response.status_code,
                "headers": _without_hop_by_hop(response.headers.raw, _RESPONSE_DROPPED),
            })
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await response.aclose()


def _without_hop_by_hop(headers: Any, dropped: frozenset[str]) -> list[tuple[bytes, bytes]]:
    """``headers`` (raw pairs) less the hop-by-hop ones and those ``Connection`` names."""
    pairs = [(bytes(name).lower(), bytes(value)) for name, value in headers]
    named = {token.strip().lower() for name, value in pairs if name == b"connection" for token in value.split(b",")}
    drop = {name.encode() for name in dropped} | named
    return [(name, value) for name, value in pairs if name not in drop]


async def _request_body(receive: Receive, body_sent: asyncio.Event) -> AsyncIterator[bytes]:
    """The client's body as it arrives; ``body_sent`` is set once all of it was read."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone
        chunk = message.get("body", b"")
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            body_sent.set()
            return


async def _disconnected(receive: Receive, body_sent: asyncio.Event) -> None:
    """Returns when the client goes away (after its body was read: until then the body
    iterator is the one reading)."""
    await body_sent.wait()
    while (await receive())["type"] != "http.disconnect":
        pass


async def _json(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
    })
    await send({"type": "http.response.body", "body": body})


async def _not_found(send: Send, session_id: str, owner: str, why: str) -> None:
    await _json(send, 404, f"session {session_id} not found: it belonged to replica {owner}, and {why}")
