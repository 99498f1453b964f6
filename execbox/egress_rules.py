"""The egress allowlist's grammar: patterns, what they match, which addresses are public.

Pure (no I/O, no name resolution) and at the bottom of the layers, because two layers
read it: :mod:`execbox.settings` checks ``SANDBOX_EGRESS_ALLOW`` at start-up with it, and
the proxy (:mod:`execbox.service.egress`) decides every connection with it.

A pattern is a host part and an optional ``:port`` (any port without one):

* ``*``: any host name or IP literal (public addresses only, see below);
* ``*.pypi.org``: any subdomain of ``pypi.org``, at any depth (not ``pypi.org`` itself);
* ``api.github.com``: exactly that name (case-insensitive, a trailing dot ignored);
* ``192.0.2.10``, ``2001:db8::10``, ``198.51.100.0/24``, ``[2001:db8::/32]``: an IP or a
  network (IPv6 in brackets when a port follows: ``[2001:db8::1]:443``).

A request names a host and a port; it is *matched* by a name rule (``*``, wildcard, exact
name) when the host is a name, by an IP/CIDR rule when the host is an IP literal (``*``
matches both). Then every address the host resolves to is checked: an address is
*permitted* when it is public (outside :data:`NON_PUBLIC_NETWORKS`: loopback, private,
shared, link-local, multicast, documentation, reserved ranges and the cloud metadata
addresses) or when an IP/CIDR rule with a matching port contains it. So an IP/CIDR rule is
the only way to reach a private or loopback address, and a name that resolves inward is
refused even when the name itself is allowed.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum

__all__ = [
    "METADATA_ADDRESSES",
    "NON_PUBLIC_NETWORKS",
    "EgressRule",
    "RuleKind",
    "address_permitted",
    "is_public",
    "match_host",
    "normalize_host",
    "parse_rule",
    "parse_rules",
    "uncovered",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: addresses cloud providers serve instance metadata and credentials on (some are public)
METADATA_ADDRESSES = ("169.254.169.254", "fd00:ec2::254", "100.100.100.200", "168.63.129.16", "192.0.0.192")
#: never public, whatever the interpreter's ipaddress module thinks (its lists change between versions)
NON_PUBLIC_NETWORKS: tuple[IPNetwork, ...] = tuple(
    ipaddress.ip_network(net)
    for net in (
        "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
        "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16", "198.18.0.0/15",
        "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4",
        "::/96", "::ffff:0:0/96", "64:ff9b::/96", "64:ff9b:1::/48", "100::/64", "2001::/23", "2001:db8::/32",
        "2002::/16", "3fff::/20", "fc00::/7", "fe80::/10", "fec0::/10", "ff00::/8",
        *(f"{a}/{32 if '.' in a else 128}" for a in METADATA_ADDRESSES),
    )
)  # fmt: skip
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_PORT = re.compile(r"[0-9]{1,5}")


class RuleKind(StrEnum):
    ANY = "any"
    WILDCARD = "wildcard"
    NAME = "name"
    NETWORK = "network"


@dataclass(frozen=True)
class EgressRule:
    """One parsed pattern: its kind, its host part, its network (IP/CIDR) and its port."""

    kind: RuleKind
    #: the name (NAME), the suffix without ``*.`` (WILDCARD), "" otherwise
    host: str = ""
    network: IPNetwork | None = None
    #: None: any port
    port: int | None = None

    def __str__(self) -> str:
        host = {RuleKind.ANY: "*", RuleKind.WILDCARD: f"*.{self.host}", RuleKind.NAME: self.host}.get(self.kind)
        if host is None:
            assert self.network is not None
            single = self.network.num_addresses == 1
            host = str(self.network.network_address) if single else str(self.network)
            if self.network.version == 6 and self.port is not None:
                host = f"[{host}]"
        return host if self.port is None else f"{host}:{self.port}"

    def port_matches(self, port: int) -> bool:
        return self.port is None or self.port == port

    def matches(self, host: str, port: int) -> bool:
        """Whether this rule allows a request for ``host`` (normalized) and ``port``."""
        if not self.port_matches(port):
            return False
        address = _ip(host)
        if self.kind is RuleKind.ANY:
            return True
        if self.kind is RuleKind.NETWORK:
            assert self.network is not None
            return address is not None and address.version == self.network.version and address in self.network
        if address is not None:
            return False
        if self.kind is RuleKind.NAME:
            return host == self.host
        return host.endswith("." + self.host)

    def covers(self, other: EgressRule) -> bool:
        """Whether everything ``other`` allows, this rule allows too (a request's narrowing)."""
        if self.port is not None and other.port != self.port:
            return False
        if other.kind is RuleKind.NETWORK:
            assert other.network is not None
            if self.kind is RuleKind.NETWORK:
                assert self.network is not None
                return other.network.version == self.network.version and other.network.subnet_of(self.network)  # type: ignore[arg-type]
            # ``*`` reaches public addresses only: it covers a network with nothing but public addresses
            return self.kind is RuleKind.ANY and not any(_overlaps(other.network, net) for net in NON_PUBLIC_NETWORKS)
        if self.kind is RuleKind.ANY:
            return True
        if self.kind is RuleKind.NAME:
            return other.kind is RuleKind.NAME and other.host == self.host
        if self.kind is RuleKind.WILDCARD:
            return other.kind in (RuleKind.NAME, RuleKind.WILDCARD) and (
                other.host.endswith("." + self.host) or (other.kind is RuleKind.WILDCARD and other.host == self.host)
            )
        return False


def _ip(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _overlaps(a: IPNetwork, b: IPNetwork) -> bool:
    return a.version == b.version and a.overlaps(b)  # type: ignore[arg-type]


def normalize_host(host: str) -> str:
    """The host as rules see it: lower case, no trailing dot, IPv6 without brackets; raises
    ValueError for what is neither a DNS name nor an IP literal."""
    text = host.strip().lower()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
        if _ip(text) is None or _ip(text).version != 6:  # type: ignore[union-attr]
            raise ValueError(f"{host!r} is not an IPv6 address in brackets")
        return str(ipaddress.ip_address(text))
    if (address := _ip(text)) is not None:
        return str(address)
    text = text.removesuffix(".")
    if len(text) > 253 or not _NAME.fullmatch(text):
        raise ValueError(f"{host!r} is not a host name or an IP address")
    return text


def _split_port(text: str) -> tuple[str, int | None]:
    """``host:port`` -> (host, port); a bare IPv6 address or network has no port."""
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise ValueError("an opening '[' without ']'")
        host, rest = text[: close + 1], text[close + 1 :]
        if not rest:
            return host, None
        if not rest.startswith(":"):
            raise ValueError(f"unexpected {rest!r} after ']'")
        return host, _parse_port(rest[1:])
    if text.count(":") > 1:  # an IPv6 address or network without brackets: no port
        return text, None
    host, sep, port = text.partition(":")
    return host, _parse_port(port) if sep else None


def _parse_port(text: str) -> int:
    if not _PORT.fullmatch(text) or not 1 <= int(text) <= 65535:
        raise ValueError(f"port {text!r} is not a number from 1 to 65535")
    return int(text)


def parse_rule(pattern: str) -> EgressRule:
    """One pattern (see the module docstring); ValueError saying what is wrong."""
    text = pattern.strip()
    try:
        if not text:
            raise ValueError("empty pattern")
        host, port = _split_port(text)
        bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        if host == "*":
            return EgressRule(RuleKind.ANY, port=port)
        if "/" in bare or _ip(bare) is not None:
            try:
                network = ipaddress.ip_network(bare, strict=True)
            except ValueError as exc:
                raise ValueError(f"not an IP address or network ({exc})") from None
            if host.startswith("[") and network.version != 6:
                raise ValueError("brackets hold IPv6 addresses only")
            return EgressRule(RuleKind.NETWORK, network=network, port=port)
        if host.startswith("*."):
            suffix = normalize_host(host[2:])
            if _ip(suffix) is not None:
                raise ValueError("a wildcard covers the subdomains of a name, not of an address")
            return EgressRule(RuleKind.WILDCARD, host=suffix, port=port)
        if "*" in host:
            raise ValueError("'*' may only be the whole host or its first label ('*.example.com')")
        return EgressRule(RuleKind.NAME, host=normalize_host(host), port=port)
    except ValueError as exc:
        raise ValueError(f"egress pattern {pattern!r}: {exc}") from None


def parse_rules(patterns: str | Iterable[str]) -> tuple[EgressRule, ...]:
    """A comma-separated list (or a sequence) of patterns; empty items are skipped, duplicates dropped."""
    items = patterns.split(",") if isinstance(patterns, str) else list(patterns)
    rules = [parse_rule(item) for item in items if not isinstance(patterns, str) or item.strip()]
    return tuple(dict.fromkeys(rules))


def match_host(rules: Sequence[EgressRule], host: str, port: int) -> EgressRule | None:
    """The first rule that allows a request for ``host`` (normalized) and ``port``, if any."""
    return next((rule for rule in rules if rule.matches(host, port)), None)


def _plain(address: IPAddress) -> IPAddress:
    """An IPv4-mapped IPv6 address as the IPv4 address it reaches."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def is_public(address: IPAddress) -> bool:
    """Outside every network of :data:`NON_PUBLIC_NETWORKS` (IPv4-mapped addresses as IPv4)."""
    address = _plain(address)
    return not any(address.version == net.version and address in net for net in NON_PUBLIC_NETWORKS)


def address_permitted(rules: Sequence[EgressRule], address: IPAddress, port: int) -> bool:
    """Whether a connection to ``address``:``port`` may be made: public, or inside an
    IP/CIDR rule that allows this port."""
    address = _plain(address)
    if is_public(address):
        return True
    return any(
        rule.kind is RuleKind.NETWORK
        and rule.port_matches(port)
        and rule.network is not None
        and address.version == rule.network.version
        and address in rule.network
        for rule in rules
    )


def uncovered(server: Sequence[EgressRule], requested: Sequence[EgressRule]) -> list[EgressRule]:
    """The requested rules that no server rule covers (a request may narrow, never widen)."""
    return [rule for rule in requested if not any(mine.covers(rule) for mine in server)]
