"""What one execution may reach: the server's rules, or the request's narrowing of them.

``/v1/execute`` may send ``"egress": [patterns]``: each must be covered by a rule of the
server's (``SANDBOX_EGRESS_ALLOW``, ``SANDBOX_ENABLE_NETWORK``); ``[]`` turns egress off
for that execution; absent, the execution gets the server's rules. With rules, the
program finds the proxy in its environment (``HTTP_PROXY`` and friends, pointing at the
driver's bridge on the sandbox's own loopback) and the driver is told to start the bridge.
"""

from __future__ import annotations

from collections.abc import Sequence

from execbox.egress_rules import EgressRule, parse_rules, uncovered
from execbox.errors import BadRequestError
from execbox.models import ExecutionRequest
from execbox.runtimes.base import EGRESS_PORT

__all__ = ["PROXY_URL", "PROXY_VARIABLES", "execution_rules", "with_proxy"]

PROXY_URL = f"http://127.0.0.1:{EGRESS_PORT}"
#: what Python's requests/urllib, curl and Node libraries read (both spellings)
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")


def execution_rules(request: ExecutionRequest, server: Sequence[EgressRule]) -> tuple[EgressRule, ...]:
    """The rules of one execution; BadRequestError for a bad pattern or one that widens the server's."""
    if request.egress is None:
        return tuple(server)
    try:
        rules = parse_rules(request.egress)
    except ValueError as exc:
        raise BadRequestError(str(exc)) from None
    if rules and not server:
        raise BadRequestError("egress: this server allows no network (SANDBOX_EGRESS_ALLOW is empty)")
    if wider := uncovered(server, rules):
        allowed = ", ".join(map(str, server))
        raise BadRequestError(
            f"egress: {', '.join(map(str, wider))} not covered by the server's allowlist ({allowed}); "
            "a request may narrow it, never widen it"
        )
    return rules


def with_proxy(request: ExecutionRequest, rules: Sequence[EgressRule]) -> ExecutionRequest:
    """The request as the driver gets it: ``egress`` resolved to the execution's rules and,
    when there are any, the proxy variables in its environment."""
    if not rules:
        return request if request.egress == () else request.model_copy(update={"egress": ()})
    env = {**request.env, **dict.fromkeys(PROXY_VARIABLES, PROXY_URL)}
    return request.model_copy(update={"egress": tuple(map(str, rules)), "env": env})
