"""Egress through the proxy, on every backend: what is allowed works unchanged, the rest is 403.

The destination is a test host in a network namespace of this module's own (see
egress_host.py), reached by name; nothing leaves this machine. The server's allowlist is
``*`` (public addresses only), plus IP rules that permit the test host's private address
on ports 80 and 443: so port 8080 of the same host, the host's loopback, the metadata
address and a name that resolves to a private address without an IP rule are refused.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
from egress_host import ADDRESS, NAME, TestHost
from prometheus_client import generate_latest

from execbox.errors import BadRequestError
from execbox.isolation.seccomp import syscall_number
from execbox.models import Status
from execbox.service.egress import ports_in_use

SERVER_ALLOW = f"*,{ADDRESS}:80,{ADDRESS}:443"
EGRESS_SETTINGS = {
    "egress_allow": SERVER_ALLOW,
    "egress_max_connections": 6,
    "egress_max_bytes": 2 << 20,
    "egress_max_connection_time": 4.0,
    "packages": "any",  # a request with packages runs in a sandbox of its own: egress reaches it too
}


@pytest.fixture(scope="module")
def test_host() -> Iterator[TestHost]:
    for tool in ("ip", "openssl"):
        if shutil.which(tool) is None:
            pytest.skip(f"the egress suite needs {tool} (apt-get install iproute2 openssl)")
    host = TestHost()
    try:
        host.start()
    except BaseException:
        host.stop()
        raise
    yield host
    host.stop()


@pytest.fixture(scope="module")
def runner(sandbox_backend: Any, sandbox_settings: Any, start_executor: Any, test_host: TestHost) -> Iterator[Any]:
    with start_executor(sandbox_backend, sandbox_settings.model_copy(update=EGRESS_SETTINGS)) as runner:
        yield runner
    left = [key for key in ports_in_use() if f"-{os.getpid()}-" in key]
    assert not left, f"egress ports left after the executor closed: {left}"


def _value(runner: Any, result: Any) -> Any:
    assert result.status is Status.SUCCESS, runner.describe(result)
    return result.result.value


PYTHON_CLIENTS = f"""
import requests, ssl, urllib.request

def main():
    context = ssl.create_default_context(cafile="ca.pem")
    return {{
        "requests http": requests.get("http://{NAME}/", timeout=20).text,
        "requests https": requests.get("https://{NAME}/", timeout=20, verify="ca.pem").text,
        "urllib http": urllib.request.urlopen("http://{NAME}/", timeout=20).read().decode(),
        "urllib https": urllib.request.urlopen("https://{NAME}/", timeout=20, context=context).read().decode(),
    }}
"""

NODE_CLIENTS = f"""
const axios = require('axios');
async function main() {{
  return {{
    'fetch http': await (await fetch('http://{NAME}/')).text(),
    'fetch https': await (await fetch('https://{NAME}/')).text(),
    'axios http': (await axios.get('http://{NAME}/')).data,
    'axios https': (await axios.get('https://{NAME}/')).data,
  }};
}}
"""


def test_python_requests_and_urllib_reach_an_allowed_host(runner: Any, test_host: TestHost) -> None:
    result = runner.run(PYTHON_CLIENTS, files={"ca.pem": test_host.certificate})  # TLS verified end to end
    assert _value(runner, result) == {
        "requests http": "hello 80 /",
        "requests https": "hello 443 /",
        "urllib http": "hello 80 /",
        "urllib https": "hello 443 /",
    }


def test_node_fetch_and_axios_reach_an_allowed_host(runner: Any) -> None:
    result = runner.run(NODE_CLIENTS, "nodejs", env={"NODE_TLS_REJECT_UNAUTHORIZED": "0"})  # the self-signed certificate
    assert _value(runner, result) == {
        "fetch http": "hello 80 /",
        "fetch https": "hello 443 /",
        "axios http": "hello 80 /",
        "axios https": "hello 443 /",
    }


def _records_of_one_execution(egress_log: list[dict[str, Any]], count: int) -> list[dict[str, Any]]:
    """The log records of the execution that was refused port 8080, once it has ``count`` of them
    (a connection of an earlier execution may be logged late, when its execution ended)."""
    deadline = time.monotonic() + 20
    while True:
        refused = [r for r in egress_log if r["port"] == 8080]
        mine = [r for r in egress_log if refused and r["execution_id"] == refused[0]["execution_id"]]
        if len(mine) >= count or time.monotonic() > deadline:
            return sorted(mine, key=lambda r: r["port"])
        time.sleep(0.05)


def test_every_attempt_is_logged(runner: Any, egress_log: list[dict[str, Any]]) -> None:
    code = f"import requests\ndef main():\n    return [requests.get('http://{NAME}/', timeout=20).status_code,\n" \
           f"            requests.get('http://{NAME}:8080/', timeout=20).status_code]\n"  # fmt: skip
    assert _value(runner, runner.run(code)) == [200, 403]
    allowed, refused = _records_of_one_execution(egress_log, 2)
    assert (allowed["decision"], allowed["port"], allowed["address"], allowed["status"]) == ("allowed", 80, ADDRESS, 200)
    assert allowed["host"] == refused["host"] == NAME
    assert allowed["bytes_up"] > 0 and allowed["bytes_down"] > len("hello 80 /")
    assert (refused["decision"], refused["port"], refused["status"]) == ("refused", 8080, 403)
    assert allowed["execution_id"] and allowed["sandbox_id"]
    assert runner.executor.egress.stats().allowed >= 1
    scraped = generate_latest(runner.executor.metrics.registry).decode()
    assert 'execbox_egress_connections_total{outcome="allowed"}' in scraped


def test_another_port_of_the_same_host_is_refused(
    runner: Any, test_host: TestHost, egress_log: list[dict[str, Any]]
) -> None:
    python = f"""
    import requests
    def main():
        answer = requests.get("http://{NAME}:8080/other-port", timeout=20)
        return [answer.status_code, answer.text]
    """
    status, text = _value(runner, runner.run(python))
    assert status == 403 and "non-public address" in text
    node = f"""
    async function main() {{
      try {{ await fetch('https://{NAME}:8080/other-port'); return 'reached'; }}
      catch (err) {{ return String(err.cause && err.cause.message || err); }}
    }}
    """
    assert _value(runner, runner.run(node, "nodejs")) != "reached"
    assert not [line for line in test_host.requests() if "other-port" in line]
    deadline = time.monotonic() + 20
    while len([r for r in egress_log if r["port"] == 8080]) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sorted((r["method"], r["status"]) for r in egress_log if r["port"] == 8080) == [("CONNECT", 403), ("GET", 403)]


def test_loopback_metadata_and_inward_names_are_refused(runner: Any) -> None:
    with socket.create_server(("127.0.0.1", 0)) as service:  # stands for the service's own port
        service.setblocking(False)
        _assert_inward_refused(runner, service.getsockname()[1])
        with pytest.raises(BlockingIOError):
            service.accept()


def _assert_inward_refused(runner: Any, port: int) -> None:
    targets = [f"http://127.0.0.1:{port}/", f"http://localhost:{port}/", "http://127.0.0.1:9385/",
               "http://localhost:9385/", "http://169.254.169.254/latest/meta-data/", "http://[::1]:9385/"]  # fmt: skip
    code = f"""
    import requests
    def main():
        out = {{}}
        for url in {targets!r}:
            answer = requests.get(url, timeout=20)
            out[url] = [answer.status_code, answer.text]
        return out
    """
    for url, (status, text) in _value(runner, runner.run(code)).items():
        assert status == 403 and "non-public address" in text, (url, text)


def test_a_name_that_resolves_to_a_private_address_needs_an_ip_rule(runner: Any, test_host: TestHost) -> None:
    code = f"""
    import requests
    def main():
        answer = requests.get("http://{NAME}/only-the-name", timeout=20)
        return [answer.status_code, answer.text]
    """
    status, text = _value(runner, runner.run(code, egress=(f"{NAME}:80",)))
    assert status == 403 and f"{NAME} resolves to {ADDRESS}, a non-public address" in text
    assert not [line for line in test_host.requests() if "only-the-name" in line]


def test_a_direct_connection_bypassing_the_proxy_fails(runner: Any, test_host: TestHost) -> None:
    code = f"""
    import socket
    def main():
        try:
            with socket.create_connection(("{ADDRESS}", 80), timeout=5) as sock:
                sock.sendall(b"GET /direct-probe HTTP/1.0\\r\\n\\r\\n")
                return "connected"
        except OSError as exc:
            return f"{{type(exc).__name__}}: {{exc}}"
    """
    assert _value(runner, runner.run(code)) != "connected"
    assert not [line for line in test_host.requests() if "direct-probe" in line]


def test_without_egress_nothing_is_reachable(runner: Any, test_host: TestHost) -> None:
    code = f"""
    import os, requests
    def main():
        out = {{"proxy variable": os.environ.get("HTTP_PROXY")}}
        for name, proxies in (("direct", None), ("the bridge's port", {{"http": "http://127.0.0.1:3128"}})):
            try:
                requests.get("http://{NAME}/no-egress", timeout=5, proxies=proxies)
                out[name] = "reached"
            except requests.RequestException as exc:
                out[name] = type(exc).__name__
        return out
    """
    value = _value(runner, runner.run(code, egress=()))
    assert value["proxy variable"] is None
    assert value["direct"] != "reached" and value["the bridge's port"] != "reached"
    assert not [line for line in test_host.requests() if "no-egress" in line]


def test_a_request_narrows_the_allowlist(runner: Any, test_host: TestHost) -> None:
    code = f"""
    import requests
    def main():
        return [requests.get("https://{NAME}/", timeout=20, verify="ca.pem").text,
                requests.get("http://{NAME}/narrowed", timeout=20).status_code]
    """
    result = runner.run(code, files={"ca.pem": test_host.certificate}, egress=(f"{NAME}:443", f"{ADDRESS}:443"))
    assert _value(runner, result) == ["hello 443 /", 403]


def test_a_request_cannot_widen_the_allowlist(runner: Any) -> None:
    with pytest.raises(BadRequestError, match="not covered by the server's allowlist"):
        runner.run("def main():\n    return 1\n", egress=("10.0.0.0/8",))
    with pytest.raises(BadRequestError, match="egress pattern"):
        runner.run("def main():\n    return 1\n", egress=("a.*.example",))


def test_the_connection_cap(runner: Any) -> None:
    code = f"""
    import requests
    def main():
        return [requests.get("http://{NAME}/", timeout=20).status_code for _ in range(8)]
    """
    assert _value(runner, runner.run(code)) == [200] * 6 + [403] * 2


def test_the_byte_cap_ends_a_connection(runner: Any) -> None:
    code = f"""
    import requests
    def main():
        try:
            return len(requests.get("http://{NAME}/bytes/8000000", timeout=20).content)
        except requests.RequestException as exc:
            return type(exc).__name__
    """
    value = _value(runner, runner.run(code))
    assert isinstance(value, str) or value < 8_000_000


def test_the_time_cap_ends_a_connection(runner: Any, egress_log: list[dict[str, Any]]) -> None:
    code = f"""
    import requests
    def main():
        try:
            requests.get("http://{NAME}/stall", timeout=60)
            return "answered"
        except requests.RequestException as exc:
            return type(exc).__name__
    """
    assert _value(runner, runner.run(code)) != "answered"
    capped = "closed at the cap of 4 s per connection"
    deadline = time.monotonic() + 20
    while capped not in [r["reason"] for r in egress_log] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert capped in [r["reason"] for r in egress_log if r["host"] == NAME]


def test_a_killed_syscall_still_ends_an_execution_with_egress(runner: Any) -> None:
    # the bridge must not keep the program's process alive: gVisor's seccomp kills only the
    # calling thread where Linux kills the process, so the bridge is a process of its own
    code = f"""
    import ctypes
    def main():
        ctypes.CDLL(None).syscall({syscall_number("syslog")}, 0, 0, 0)  # which the filter kills
        return "survived"
    """
    result = runner.run(code)
    if not runner.inner_wall:
        # single-use gVisor applies no built-in filter: gVisor answers the call itself, and the
        # bridge must still let the program end by itself, not at its time limit
        assert result.status is Status.SUCCESS and result.result.value == "survived", runner.describe(result)
        return
    assert result.status is Status.UNAUTHORIZED_ACCESS, runner.describe(result)
    assert result.detail == "disallowed_syscall"


def test_a_request_with_packages_has_egress_too(runner: Any) -> None:
    code = f"""
    import requests, tabulate
    def main():
        return [tabulate.__version__, requests.get("http://{NAME}/with-packages", timeout=20).text]
    """
    result = runner.run(code, packages=("tabulate==0.9.0",))
    assert _value(runner, result) == ["0.9.0", "hello 80 /with-packages"]
