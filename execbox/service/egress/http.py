"""The proxy's side of HTTP: read what a client asks the proxy for, and answer a refusal.

Pure: bytes in, a :class:`ProxyRequest` (or a :class:`Refusal`) out. Two forms are
served: ``CONNECT host:port`` (HTTPS and any other TLS, tunnelled untouched) and an
absolute-URI request ``GET http://host[:port]/path`` (plain HTTP), which is forwarded in
origin form with ``Host`` set from the URI (RFC 9112 section 3.2.2), the proxy's own
headers removed and ``Connection: close`` (one request per connection, so every request
is decided on its own).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from execbox.egress_rules import normalize_host

__all__ = ["MAX_HEAD_BYTES", "ProxyRequest", "Refusal", "parse_head", "refusal_response"]

#: the largest request line + headers the proxy reads
MAX_HEAD_BYTES = 64 << 10
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_REASONS = {400: "Bad Request", 403: "Forbidden", 408: "Request Timeout", 502: "Bad Gateway", 504: "Gateway Timeout"}
#: headers meant for the proxy (or for one hop), never forwarded
_HOP_HEADERS = frozenset({"connection", "keep-alive", "proxy-connection", "proxy-authorization", "host", "te", "upgrade"})


class Refusal(Exception):
    """The proxy's answer to a request it does not carry out: an HTTP status and why."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class ProxyRequest:
    """What a client asked for: the method, the (normalized) host and port, and for plain
    HTTP the request head to send upstream."""

    method: str
    host: str
    port: int
    #: CONNECT: a tunnel, nothing is sent upstream by the proxy
    tunnel: bool
    head: bytes = b""


def _authority(text: str) -> tuple[str, int]:
    """``host:port`` of a CONNECT (IPv6 in brackets); the port is required."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise Refusal(400, f"CONNECT wants host:port, not {text!r}")
    return _host(host), int(port)


def _host(text: str) -> str:
    try:
        return normalize_host(text)
    except ValueError as exc:
        raise Refusal(400, str(exc)) from None


def parse_head(head: bytes) -> ProxyRequest:
    """The request line and headers (ending with the empty line) of one proxy request."""
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes every byte
        raise Refusal(400, "undecodable request") from None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or parts[2] not in ("HTTP/1.0", "HTTP/1.1"):
        raise Refusal(400, "not an HTTP/1.x request line")
    method, target, version = parts
    if method == "CONNECT":
        host, port = _authority(target)
        return ProxyRequest(method, host, port, tunnel=True)
    url = urlsplit(target)
    if url.scheme.lower() != "http" or not url.netloc:
        if url.scheme.lower() == "https":
            raise Refusal(400, "https:// goes through CONNECT (a tunnel), not as an absolute URI")
        raise Refusal(400, "a proxy request names an absolute http:// URI or uses CONNECT")
    try:
        port = url.port or 80
    except ValueError:
        raise Refusal(400, f"bad port in {target!r}") from None
    host = _host(url.hostname or "")
    authority = url.netloc.rpartition("@")[2]
    path = url.path or "/"
    if url.query:
        path += "?" + url.query
    headers = [f"{method} {path} {version}", f"Host: {authority}"]
    dropped = set(_HOP_HEADERS)
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep and name.strip().lower() == "connection":
            dropped.update(v.strip().lower() for v in value.split(","))
    for line in lines[1:]:
        if not line:
            continue
        name, sep, _ = line.partition(":")
        if not sep or not _TOKEN.fullmatch(name):
            raise Refusal(400, "malformed header line")
        if name.lower() not in dropped:
            headers.append(line)
    headers.append("Connection: close")
    return ProxyRequest(method, host, port, tunnel=False, head=("\r\n".join(headers) + "\r\n\r\n").encode("latin-1"))


def refusal_response(status: int, reason: str) -> bytes:
    """A short plain-text answer that closes the connection."""
    body = f"execbox egress proxy: {reason}\n".encode()
    head = (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body
