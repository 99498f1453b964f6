"""Network egress by allowlist, through an audited proxy outside the sandbox.

A sandbox never gets a network interface but loopback. With an allowlist
(``SANDBOX_EGRESS_ALLOW``, or ``SANDBOX_ENABLE_NETWORK=true`` for ``*``):

* the service runs one :class:`EgressProxy` (its own asyncio loop in a thread of the
  service's process);
* every sandbox, when it is built (warm, before any request), gets its own listening UNIX
  socket on the host, in a directory of its own bound read-only at ``/run/egress`` inside
  (bwrap and the fork server: a bind mount; gVisor: bound into the gVisor sandbox and,
  with two walls, again into each inner sandbox, reached through ``runsc --host-uds=open``);
  its network namespace's loopback interface is up and its seccomp filter lets it create
  AF_INET/AF_INET6 sockets, which reach nothing but that loopback;
* an execution with rules is attached to its sandbox's socket for the length of its run
  (so the proxy knows which execution, and which rules, a connection belongs to: the
  per-request narrowing costs nothing at build time), and the driver, told so in the
  request frame, starts a bridge on ``127.0.0.1:3128`` inside the sandbox's own network
  namespace that forwards each TCP connection to the socket; ``HTTP_PROXY`` and
  ``HTTPS_PROXY`` point at it, so Python's requests/urllib and Node's fetch (the driver
  installs undici's ProxyAgent) and axios use it without code changes;
* the proxy decides each connection (see :mod:`.proxy`) and logs it.

This is the design of Anthropic's sandbox-runtime for bubblewrap (a proxy outside, a
socket bound in, a bridge on the sandbox's loopback). Hand-written rather than a proxy
server package: the decision needs the execution behind each socket, the addresses the
proxy itself resolved, and per-execution caps, which no off-the-shelf forward proxy offers
without running a second service. An execution without egress pays nothing: no bridge is
started, and without an allowlist the sandboxes are exactly as before (no socket, no
loopback, AF_UNIX only).
"""

from execbox.service.egress.execution import (
    PROXY_URL,
    PROXY_VARIABLES,
    execution_rules,
    with_proxy,
)
from execbox.service.egress.metrics import EgressMetrics
from execbox.service.egress.proxy import (
    EGRESS_PORTS_DIR,
    EgressCaps,
    EgressProxy,
    EgressStats,
    ports_in_use,
)

__all__ = [
    "EGRESS_PORTS_DIR",
    "PROXY_URL",
    "PROXY_VARIABLES",
    "EgressCaps",
    "EgressMetrics",
    "EgressProxy",
    "EgressStats",
    "execution_rules",
    "ports_in_use",
    "with_proxy",
]
