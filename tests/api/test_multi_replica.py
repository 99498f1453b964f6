"""Several replicas behind one address, on one machine: what a cluster of execbox must hold.

Two real services (``execbox serve``, replica names ``a`` and ``b``, each told where the
other is by SANDBOX_REPLICA_PEERS), one Redis (Debian's ``redis-server``, on a loopback
port, in a temporary directory) and a real reverse proxy in front (Debian's ``haproxy``,
round-robin, which names the replica that answered in ``X-Served-By``), all on 127.0.0.1:

* a session made through the proxy keeps its state whichever replica the proxy picks for
  the next call (the other one forwards the call to the session's replica);
* a per-key rate quota holds across both replicas (counted in the one Redis);
* stopping one replica makes its sessions 404 and leaves the other serving.

haproxy and redis-server are installed with apt-get when missing (``make setup`` installs
them too); the module is skipped, with the reason, only when they cannot be.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import api_helpers
import httpx
import httpx2
import pytest
from api_helpers import Service, free_port
from mcp import Client
from mcp.client.streamable_http import streamable_http_client


HAPROXY = "/usr/sbin/haproxy"
REDIS = "/usr/bin/redis-server"
#: one API key per test (each key has a rate quota of its own): name -> key
KEYS = {test: f"mr-{test}-key-0123456789abcdef" for test in ("state", "quota", "stop")}
#: the per-key rate of both replicas (per hour, so that no window ends during the test)
RATE_PER_HOUR = 40
#: tenancy (API keys, Redis quotas) is in this execbox when its settings are
START_TIMEOUT_S = 30.0


def _ensure(path: str, package: str) -> str | None:
    """None when ``path`` exists (installing ``package`` with apt-get if need be), else why not."""
    if Path(path).exists():
        return None
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        return f"{package} is missing and cannot be installed here (needs apt-get as root)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "--no-install-recommends", package]):
        done = subprocess.run(argv, capture_output=True, text=True, timeout=900, env=env, check=False)
        if done.returncode != 0:
            return f"{' '.join(argv)} failed: {(done.stderr or done.stdout)[-500:]}"
    return None if Path(path).exists() else f"{package} installed but {path} is missing"


def _wait_for_port(port: int, process: subprocess.Popen[bytes], what: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}:\n{log.read_text(errors='replace')[-2000:]}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{what} does not listen on 127.0.0.1:{port} after {START_TIMEOUT_S:g}s")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class Replica(Service):
    """A test service on a port chosen before it starts (its peers need it in their settings)."""

    def __init__(self, name: str, port: int, settings: dict[str, str]) -> None:
        super().__init__(f"replica-{name}", settings)
        self.fixed_port = port

    def start(self, require_healthy: bool = True) -> Service:
        with mock.patch.object(api_helpers, "free_port", lambda: self.fixed_port):
            return super().start(require_healthy)


@pytest.fixture(scope="module")
def cluster(backend_ready: None) -> Iterator[dict[str, Any]]:
    """Redis, replicas a and b, haproxy in front; everything stopped and removed at the end."""
    for path, package in ((HAPROXY, "haproxy"), (REDIS, "redis-server")):
        why = _ensure(path, package)
        if why is not None:
            pytest.skip(f"the multi-replica test needs {package}: {why}")
    root = Path(tempfile.mkdtemp(prefix="execbox-multi-replica-"))
    processes: list[subprocess.Popen[bytes]] = []
    replicas: dict[str, Replica] = {}
    try:
        redis_port = free_port()
        redis_log = root / "redis.log"
        with redis_log.open("wb") as log:
            redis = subprocess.Popen(
                [REDIS, "--port", str(redis_port), "--bind", "127.0.0.1", "--dir", str(root), "--save", "",
                 "--appendonly", "no", "--daemonize", "no", "--protected-mode", "yes"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        processes.append(redis)
        _wait_for_port(redis_port, redis, "redis-server", redis_log)

        ports = {"a": free_port(), "b": free_port()}
        peers = ",".join(f"{name}=http://127.0.0.1:{port}" for name, port in ports.items())
        for name, port in ports.items():
            settings = {
                "SANDBOX_REPLICA_NAME": name,
                "SANDBOX_REPLICA_PEERS": peers,
                "SANDBOX_EXECUTOR_MANAGER_POOL_SIZE": "1",
                "SANDBOX_MAX_SESSIONS": "4",
                "SANDBOX_CODE_CHECK": "guard",
            }
            settings.update({
                "SANDBOX_API_KEYS": ",".join(f"{name}:{key}" for name, key in KEYS.items()),
                "SANDBOX_KEY_RATE": f"{RATE_PER_HOUR}/hour",
                "SANDBOX_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
            })
            replicas[name] = Replica(name, port, settings)
        for replica in replicas.values():
            replica.start()

        proxy_port = free_port()
        config = root / "haproxy.cfg"
        config.write_text("\n".join([
            "global",
            "    log stderr format raw local0 info",
            "defaults",
            "    mode http",
            "    log global",
            "    option httplog",
            "    timeout connect 2s",
            "    timeout client 60s",
            "    timeout server 60s",
            "    retries 2",
            "    option redispatch 1",
            "    retry-on conn-failure empty-response",
            "frontend execbox",
            f"    bind 127.0.0.1:{proxy_port}",
            "    default_backend replicas",
            "backend replicas",
            "    balance roundrobin",
            "    http-response set-header X-Served-By %s",
            *(f"    server {name} 127.0.0.1:{port}" for name, port in ports.items()),
            "",
        ]))
        proxy_log = root / "haproxy.log"
        check = subprocess.run([HAPROXY, "-c", "-f", str(config)], capture_output=True, text=True, timeout=30, check=False)
        assert check.returncode == 0, f"haproxy refuses the test's configuration:\n{check.stdout}{check.stderr}"
        with proxy_log.open("wb") as log:
            proxy = subprocess.Popen([HAPROXY, "-db", "-f", str(config)], stdin=subprocess.DEVNULL, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        processes.append(proxy)
        _wait_for_port(proxy_port, proxy, "haproxy", proxy_log)
        yield {"url": f"http://127.0.0.1:{proxy_port}", "replicas": replicas, "redis_port": redis_port}
    finally:
        for process in reversed(processes):
            _stop(process)
        for replica in replicas.values():
            replica.cleanup()
        shutil.rmtree(root, ignore_errors=True)


def auth(test: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[test]}"}


def through_proxy(cluster: dict[str, Any], test: str) -> httpx.Client:
    return httpx.Client(base_url=cluster["url"], timeout=60, headers=auth(test))


def _served_by(response: httpx.Response) -> str:
    return response.headers["x-served-by"]


def _new_session(proxy: httpx.Client) -> tuple[str, str]:
    response = proxy.post("/v1/sessions", json={"language": "python"})
    assert response.status_code == 201, response.text
    return response.json()["id"], _served_by(response)


def test_a_session_keeps_its_state_whichever_replica_the_proxy_picks(cluster: dict[str, Any]) -> None:
    with through_proxy(cluster, "state") as proxy:
        check_state_is_kept(proxy)


def check_state_is_kept(proxy: httpx.Client) -> None:
    created = [_new_session(proxy) for _ in range(2)]
    # round robin: one session on each replica, each id naming the replica that made it
    assert {made_by for _, made_by in created} == {"a", "b"}
    for sid, made_by in created:
        assert sid.split(".")[0] == made_by
    for sid, made_by in created:
        answered_by = set()
        cells = ["counter = 0", *["counter += 1"] * 4, "counter"]
        for code in cells:
            response = proxy.post(f"/v1/sessions/{sid}/execute", json={"code": code})
            assert response.status_code == 200, response.text
            assert response.json()["status"] == "success", response.text
            answered_by.add(_served_by(response))
        assert response.json()["result"] == {"present": True, "value": 4, "type": "json"}
        assert answered_by == {"a", "b"}  # the proxy sent calls to both; the state held
        data = bytes(range(256)) * 16
        put = proxy.put(f"/v1/sessions/{sid}/files/in/data.bin", content=data)
        assert put.status_code == 201 and put.json() == {"path": "in/data.bin", "size": len(data)}
        for _ in range(2):  # once through each replica
            got = proxy.get(f"/v1/sessions/{sid}/files/in/data.bin")
            assert got.status_code == 200 and got.content == data
        described = [proxy.get(f"/v1/sessions/{sid}") for _ in range(2)]
        assert {_served_by(r) for r in described} == {"a", "b"}
        assert all(r.status_code == 200 and r.json()["id"] == sid and r.json()["executions"] == len(cells) for r in described)
        assert proxy.delete(f"/v1/sessions/{sid}").status_code == 204
        assert [proxy.get(f"/v1/sessions/{sid}").status_code for _ in range(2)] == [404, 404]


def test_an_mcp_session_keeps_its_state_whichever_replica_the_proxy_picks(cluster: dict[str, Any]) -> None:
    """MCP's session tools carry the id in their body: the replica that gets the call sends
    it on to the one that owns the session."""

    async def calls() -> list[Any]:
        async with httpx2.AsyncClient(headers=auth("state"), timeout=60) as http:
            async with Client(streamable_http_client(f"{cluster['url']}/mcp", http_client=http)) as client:
                created = await client.call_tool("create_session", {"language": "python"})
                sid = created.structured_content["session_id"]
                results = [await client.call_tool("run_in_session", {"session_id": sid, "code": code})
                           for code in ["n = 40", "n += 1", "n += 1", "n"]]
                closed = await client.call_tool("close_session", {"session_id": sid})
                after = await client.call_tool("run_in_session", {"session_id": sid, "code": "n"})
                return [results, closed, after]

    results, closed, after = asyncio.run(calls())
    assert not any(r.is_error for r in results), results
    assert "result: 42" in results[-1].content[0].text, results[-1].content[0].text
    assert not closed.is_error and after.is_error


def test_a_per_key_rate_quota_holds_across_both_replicas(cluster: dict[str, Any]) -> None:
    with through_proxy(cluster, "quota") as proxy:
        answers = [proxy.post("/v1/execute", json={"language": "python", "code": "print(1)"})
                   for _ in range(RATE_PER_HOUR + 4)]
    assert {_served_by(r) for r in answers} == {"a", "b"}
    codes = [r.status_code for r in answers]
    # RATE_PER_HOUR in all, not per replica (each replica alone would have let every call in)
    assert codes == [200] * RATE_PER_HOUR + [429] * 4, codes
    assert all("retry-after" in r.headers for r in answers[RATE_PER_HOUR:])


def test_stopping_a_replica_404s_its_sessions_and_leaves_the_other_serving(cluster: dict[str, Any]) -> None:
    headers = auth("stop")
    survivor, stopped = cluster["replicas"]["a"], cluster["replicas"]["b"]
    with survivor.client(headers=headers) as on_a, stopped.client(headers=headers) as on_b:
        kept = on_a.post("/v1/sessions", json={"language": "python"}).json()["id"]
        lost = on_b.post("/v1/sessions", json={"language": "python"}).json()["id"]
        assert on_a.post(f"/v1/sessions/{kept}/execute", json={"code": "kept = 'yes'"}).status_code == 200
        assert on_a.post(f"/v1/sessions/{lost}/execute", json={"code": "1"}).status_code == 200  # forwarded to b
    assert stopped.stop() in (0, -signal.SIGTERM), stopped.log_tail()  # uvicorn may re-raise the SIGTERM
    with through_proxy(cluster, "stop") as proxy:
        for _ in range(2):  # whichever replica haproxy tries first, b is gone
            gone = proxy.post(f"/v1/sessions/{lost}/execute", json={"code": "1"})
            assert gone.status_code == 404, gone.text
            assert isinstance(gone.json()["detail"], str) and "b" in gone.json()["detail"]
            still = proxy.post(f"/v1/sessions/{kept}/execute", json={"code": "kept"})
            assert still.status_code == 200 and still.json()["result"]["value"] == "yes", still.text
        fresh = proxy.post("/v1/sessions", json={"language": "python"})
        assert fresh.status_code == 201 and fresh.json()["id"].startswith("a.")
        run = proxy.post("/v1/execute", json={"language": "python", "code": "print(6 * 7)"})
        assert run.status_code == 200 and run.json()["stdout"] == "42\n"
        assert {_served_by(proxy.get("/healthz")) for _ in range(3)} == {"a"}
