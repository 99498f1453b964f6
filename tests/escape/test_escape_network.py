"""Escape: no network, neither the host's loopback nor a route outward.

Safety: these tests never send a packet to any address but loopback. The outward probe
is a UDP ``connect()`` to a documentation address (192.0.2.1, RFC 5737; 2001:db8::1,
RFC 3849): connecting a UDP socket only picks a route, it sends nothing.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from execbox.models import Status, UnauthorizedAccessType

if TYPE_CHECKING:
    from tests.conftest import SandboxRunner


@pytest.fixture
def loopback_listener() -> Iterator[socket.socket]:
    """A TCP listener on the host's 127.0.0.1; a sandbox must not reach it."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    try:
        yield listener
    finally:
        listener.close()


def _assert_nobody_connected(listener: socket.socket) -> None:
    with pytest.raises(BlockingIOError):
        conn, peer = listener.accept()
        conn.close()
        pytest.fail(f"a sandbox connected to the host's loopback listener from {peer}")


def test_host_loopback_listener_is_unreachable(executor: SandboxRunner, loopback_listener: socket.socket) -> None:
    port = loopback_listener.getsockname()[1]
    result = executor.run(
        f"""
        import socket

        def main():
            out = {{}}
            for host in ("127.0.0.1", "localhost", "::1"):
                try:
                    with socket.create_connection((host, {port}), timeout=3):
                        out[host] = "connected"
                except OSError as exc:
                    out[host] = f"{{type(exc).__name__}}: {{exc}}"
            return out
        """
    )
    assert result.status is Status.SUCCESS, executor.describe(result)
    for host, outcome in result.result.value.items():  # type: ignore[union-attr]
        assert outcome != "connected", f"the sandbox reached the host's listener via {host}"
    _assert_nobody_connected(loopback_listener)
    executor.assert_still_works()


def test_dying_on_a_connection_attempt_is_network_access(
    executor: SandboxRunner, loopback_listener: socket.socket
) -> None:
    port = loopback_listener.getsockname()[1]
    result = executor.run(
        f"""
        import socket

        def main():
            socket.create_connection(("127.0.0.1", {port}), timeout=3)
            return "connected"
        """
    )
    assert result.status is Status.UNAUTHORIZED_ACCESS, executor.describe(result)
    assert result.unauthorized_access_type is UnauthorizedAccessType.NETWORK_ACCESS
    assert result.result is None or not result.result.present
    _assert_nobody_connected(loopback_listener)
    executor.assert_still_works()


def test_nodejs_cannot_reach_the_host_loopback(executor: SandboxRunner, loopback_listener: socket.socket) -> None:
    port = loopback_listener.getsockname()[1]
    result = executor.run(
        f"""
        const net = require('net');
        function main() {{
          return new Promise((resolve) => {{
            const sock = net.connect({{ host: '127.0.0.1', port: {port} }});
            sock.setTimeout(3000, () => {{ sock.destroy(); resolve('timeout'); }});
            sock.on('connect', () => {{ sock.destroy(); resolve('connected'); }});
            sock.on('error', (err) => resolve('error: ' + err.code));
          }});
        }}
        """,
        "nodejs",
    )
    assert result.status in (Status.SUCCESS, Status.UNAUTHORIZED_ACCESS, Status.PROGRAM_ERROR), executor.describe(result)
    assert result.result is None or result.result.value != "connected"
    _assert_nobody_connected(loopback_listener)
    executor.assert_still_works(("python", "nodejs"))


def test_there_is_no_route_outward(executor: SandboxRunner) -> None:
    # connect() on a UDP socket only chooses a route: no packet leaves, whatever happens
    result = executor.run(
        """
        import socket

        def main():
            out = {}
            for family, address in ((socket.AF_INET, ("192.0.2.1", 53)), (socket.AF_INET6, ("2001:db8::1", 53))):
                try:
                    with socket.socket(family, socket.SOCK_DGRAM) as sock:
                        sock.connect(address)
                        out[address[0]] = "route found via " + str(sock.getsockname())
                except OSError as exc:
                    out[address[0]] = f"{type(exc).__name__}: {exc}"
            return out
        """
    )
    assert result.status is Status.SUCCESS, executor.describe(result)
    value = result.result.value  # type: ignore[union-attr]
    assert set(value) == {"192.0.2.1", "2001:db8::1"}
    for address, outcome in value.items():
        assert not outcome.startswith("route found"), f"the sandbox has a route to {address}: {outcome}"
    executor.assert_still_works()


def test_only_the_loopback_interface_exists(executor: SandboxRunner) -> None:
    result = executor.run(
        """
        def main():
            try:
                with open("/proc/net/dev") as fh:
                    lines = fh.read().splitlines()[2:]
            except OSError as exc:
                return {"error": str(exc)}
            return {"interfaces": sorted(line.split(":")[0].strip() for line in lines if ":" in line)}
        """
    )
    assert result.status is Status.SUCCESS, executor.describe(result)
    value = result.result.value  # type: ignore[union-attr]
    assert value.get("interfaces", []) in ([], ["lo"]), f"the sandbox sees network interfaces: {value}"
    executor.assert_still_works()


def test_raw_and_packet_sockets_are_refused(executor: SandboxRunner) -> None:
    # creating these sockets sends nothing; only their creation is attempted
    result = executor.run(
        """
        import socket

        def main():
            out = {}
            kinds = {
                "raw icmp": (socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP),
                "packet": (socket.AF_PACKET, socket.SOCK_RAW, 0x0300),
                "netlink route": (socket.AF_NETLINK, socket.SOCK_RAW, 0),
            }
            for name, args in kinds.items():
                try:
                    socket.socket(*args).close()
                    out[name] = "created"
                except OSError as exc:
                    out[name] = f"{type(exc).__name__}: {exc}"
            return out
        """
    )
    assert result.status is Status.SUCCESS, executor.describe(result)
    value = result.result.value  # type: ignore[union-attr]
    assert value["raw icmp"] != "created"
    assert value["packet"] != "created"
    if executor.inner_wall:
        # the seccomp filter refuses every family but AF_UNIX while the network is off
        assert value["netlink route"] != "created"
    executor.assert_still_works()
