"""The egress allowlist grammar: patterns, matching, address classes, narrowing, the setting."""

from __future__ import annotations

import ipaddress

import pytest

from execbox.egress_rules import (
    RuleKind,
    address_permitted,
    is_public,
    match_host,
    normalize_host,
    parse_rule,
    parse_rules,
    uncovered,
)


@pytest.mark.parametrize(
    ("pattern", "kind", "text"),
    [
        ("*", RuleKind.ANY, "*"),
        ("*:443", RuleKind.ANY, "*:443"),
        ("API.GitHub.com.", RuleKind.NAME, "api.github.com"),
        ("api.github.com:443", RuleKind.NAME, "api.github.com:443"),
        ("*.pypi.org", RuleKind.WILDCARD, "*.pypi.org"),
        ("192.0.2.10", RuleKind.NETWORK, "192.0.2.10"),
        ("10.203.0.0/30:8080", RuleKind.NETWORK, "10.203.0.0/30:8080"),
        ("2001:db8::/32", RuleKind.NETWORK, "2001:db8::/32"),
        ("[2001:db8::1]:443", RuleKind.NETWORK, "[2001:db8::1]:443"),
        ("[::1]", RuleKind.NETWORK, "::1"),
    ],
)
def test_patterns_parse_and_print_back(pattern: str, kind: RuleKind, text: str) -> None:
    rule = parse_rule(pattern)
    assert rule.kind is kind
    assert str(rule) == text
    assert parse_rule(text) == rule


@pytest.mark.parametrize(
    ("pattern", "says"),
    [
        ("", "empty"),
        ("a.*.example.com", "'*' may only be"),
        ("*.10.0.0.1", "not of an address"),
        ("example.com:0", "from 1 to 65535"),
        ("example.com:70000", "from 1 to 65535"),
        ("example.com:https", "is not a number"),
        ("10.0.0.1/8", "host bits"),
        ("[10.0.0.1]", "IPv6 addresses only"),
        ("exa mple.com", "not a host name"),
        ("[2001:db8::1", "without ']'"),
    ],
)
def test_bad_patterns_say_what_is_wrong(pattern: str, says: str) -> None:
    with pytest.raises(ValueError, match="egress pattern") as caught:
        parse_rule(pattern)
    assert says in str(caught.value)


def test_a_list_skips_empty_items_and_duplicates() -> None:
    assert [str(r) for r in parse_rules(" a.example.com, ,a.example.com,*.b.example.com ")] == [
        "a.example.com",
        "*.b.example.com",
    ]
    with pytest.raises(ValueError, match="empty"):
        parse_rules(["a.example.com", ""])  # a request's list names no empty pattern


@pytest.mark.parametrize(
    ("patterns", "host", "port", "allowed"),
    [
        ("api.github.com", "api.github.com", 443, True),
        ("api.github.com", "api.github.com", 8080, True),  # no port: any port
        ("api.github.com:443", "api.github.com", 80, False),
        ("api.github.com", "github.com", 443, False),
        ("api.github.com", "evil-api.github.com", 443, False),
        ("*.pypi.org", "files.pypi.org", 443, True),
        ("*.pypi.org", "a.b.pypi.org", 443, True),
        ("*.pypi.org", "pypi.org", 443, False),
        ("*.pypi.org", "notpypi.org", 443, False),
        ("*", "anything.example", 1, True),
        ("*", "10.0.0.1", 80, True),  # matched; the address check comes after
        ("*:443", "example.com", 80, False),
        ("10.203.0.0/30", "10.203.0.2", 80, True),
        ("10.203.0.0/30", "10.203.0.9", 80, False),
        ("10.203.0.0/30", "egress.example", 80, False),  # a name is not matched by an IP rule
        ("egress.example", "10.203.0.2", 80, False),  # nor an IP literal by a name rule
        ("2001:db8::/32", "2001:db8::5", 443, True),
    ],
)
def test_matching_the_host_asked_for(patterns: str, host: str, port: int, allowed: bool) -> None:
    assert (match_host(parse_rules(patterns), normalize_host(host), port) is not None) is allowed


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1", "127.8.9.10", "10.1.2.3", "172.16.0.1", "172.31.255.255", "192.168.1.1", "100.64.0.1",
        "169.254.169.254", "169.254.1.1", "0.0.0.0", "224.0.0.1", "239.255.255.250", "255.255.255.255",
        "192.0.2.1", "198.18.0.1", "168.63.129.16", "100.100.100.200",
        "::1", "::", "fe80::1", "fc00::1", "fd00:ec2::254", "ff02::1", "::ffff:127.0.0.1", "::ffff:10.0.0.1",
        "64:ff9b::a00:1", "2002:7f00:1::", "2001:db8::1",
    ],
)  # fmt: skip
def test_inward_addresses_are_not_public(address: str) -> None:
    assert not is_public(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "151.101.0.223", "2606:4700:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses_are_public(address: str) -> None:
    assert is_public(ipaddress.ip_address(address))


def test_only_an_ip_rule_permits_an_inward_address() -> None:
    private = ipaddress.ip_address("10.203.0.2")
    assert not address_permitted(parse_rules("*,egress.example"), private, 80)
    assert address_permitted(parse_rules("10.203.0.0/30"), private, 80)
    assert address_permitted(parse_rules("10.203.0.2:80"), private, 80)
    assert not address_permitted(parse_rules("10.203.0.2:80"), private, 8080)  # the rule's port counts
    assert not address_permitted(parse_rules("10.203.0.0/30"), ipaddress.ip_address("127.0.0.1"), 80)
    assert address_permitted(parse_rules("127.0.0.1"), ipaddress.ip_address("::ffff:127.0.0.1"), 80)
    assert address_permitted((), ipaddress.ip_address("8.8.8.8"), 443)


@pytest.mark.parametrize(
    ("server", "requested", "wider"),
    [
        ("*", "api.github.com:443,*.pypi.org", []),
        ("*", "8.8.8.0/24", []),  # * reaches public addresses: a public network is within it
        ("*", "10.0.0.0/8", ["10.0.0.0/8"]),  # ... a private one is not
        ("*", "0.0.0.0/0", ["0.0.0.0/0"]),
        ("*:443", "api.github.com", ["api.github.com"]),
        ("*:443", "api.github.com:443", []),
        ("*.example.com", "a.example.com,*.b.example.com,*.example.com", []),
        ("*.example.com", "example.com", ["example.com"]),
        ("a.example.com", "b.example.com", ["b.example.com"]),
        ("a.example.com", "*", ["*"]),
        ("10.203.0.0/30", "10.203.0.2:80,10.203.0.0/31", []),
        ("10.203.0.0/30", "10.203.0.0/24", ["10.203.0.0/24"]),
        ("10.203.0.2:80", "10.203.0.2", ["10.203.0.2"]),
        ("api.github.com", "10.203.0.2", ["10.203.0.2"]),
    ],
)
def test_a_request_may_narrow_never_widen(server: str, requested: str, wider: list[str]) -> None:
    assert [str(r) for r in uncovered(parse_rules(server), parse_rules(requested))] == wider
