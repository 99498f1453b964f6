"""A test host for the egress suite, in a network namespace the test creates and removes.

``10.203.0.2`` in namespace ``execbox-eg-<pid>``, joined to the host by a veth pair
(``10.203.0.1`` on the host side): HTTP on ports 80 and 8080, HTTPS with a self-signed
certificate on 443, all answering ``hello <port> <path>`` (``/bytes/N``: N bytes, ``/stall``:
nothing for a minute). It is reached by the name :data:`NAME`, an ``/etc/hosts`` entry
added for the test's duration (the proxy resolves names on the host). Nothing here ever
talks to anything outside this machine. Every request the host serves is written to its
log (``requests()``), so a test can tell that a probe never arrived.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import textwrap
import time
from pathlib import Path

__all__ = ["ADDRESS", "NAME", "TestHost"]

NAME = "egress.execbox.test"
ADDRESS = "10.203.0.2"
_GATEWAY = "10.203.0.1"
_HOSTS = Path("/etc/hosts")
_SERVER = textwrap.dedent(
    """
    import http.server, ssl, sys, threading, time
    directory = sys.argv[1]

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            with open(directory + "/requests.log", "a") as log:
                log.write(f"{self.server.server_port} {self.path}\\n")
            if self.path == "/stall":
                time.sleep(60)
                return
            if self.path.startswith("/bytes/"):
                body = b"x" * int(self.path.rsplit("/", 1)[1])
            else:
                body = f"hello {self.server.server_port} {self.path}".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    servers = []
    for port in (80, 8080, 443):
        server = http.server.ThreadingHTTPServer(("ADDRESS", port), Handler)
        server.daemon_threads = True
        if port == 443:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(directory + "/cert.pem", directory + "/key.pem")
            server.socket = context.wrap_socket(server.socket, server_side=True)
        servers.append(server)
        threading.Thread(target=server.serve_forever, daemon=True).start()
    print("ready", flush=True)
    sys.stdin.read()
    """
).replace("ADDRESS", ADDRESS)


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=30)


class TestHost:
    """``start()`` builds the namespace, the servers and the hosts entry; ``stop()`` removes them."""

    __test__ = False  # not a test class

    def __init__(self) -> None:
        self.netns = f"execbox-eg-{os.getpid()}"
        self._veth = f"veg{os.getpid() % 100000}"
        self._marker = f"# execbox egress test {os.getpid()}"
        self.directory = Path(tempfile.mkdtemp(prefix="execbox-egress-host-"))
        self._server: subprocess.Popen[bytes] | None = None

    @property
    def certificate(self) -> bytes:
        return (self.directory / "cert.pem").read_bytes()

    def requests(self) -> list[str]:
        """``<port> <path>`` of every request the host has served."""
        log = self.directory / "requests.log"
        return log.read_text().splitlines() if log.exists() else []

    def start(self) -> None:
        self._reap_stale()
        _run(
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", f"/CN={NAME}",
            "-addext", f"subjectAltName=DNS:{NAME}", "-keyout", str(self.directory / "key.pem"),
            "-out", str(self.directory / "cert.pem"),
        )  # fmt: skip
        _run("ip", "netns", "add", self.netns)
        _run("ip", "link", "add", f"{self._veth}h", "type", "veth", "peer", "name", f"{self._veth}n")
        _run("ip", "link", "set", f"{self._veth}n", "netns", self.netns)
        _run("ip", "addr", "add", f"{_GATEWAY}/30", "dev", f"{self._veth}h")
        _run("ip", "link", "set", f"{self._veth}h", "up")
        inside = ("ip", "netns", "exec", self.netns)
        _run(*inside, "ip", "addr", "add", f"{ADDRESS}/30", "dev", f"{self._veth}n")
        _run(*inside, "ip", "link", "set", f"{self._veth}n", "up")
        _run(*inside, "ip", "link", "set", "lo", "up")
        self._server = subprocess.Popen(
            [*inside, "/usr/bin/python3", "-c", _SERVER, str(self.directory)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        assert self._server.stdout is not None
        if self._server.stdout.readline().strip() != b"ready":
            raise RuntimeError(f"the test host did not start: {self._server.stdout.read().decode(errors='replace')}")
        self._wait_reachable()
        text = _HOSTS.read_text()
        _HOSTS.write_text(text + ("" if text.endswith("\n") else "\n") + f"{ADDRESS} {NAME} {self._marker}\n")

    def _wait_reachable(self) -> None:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection((ADDRESS, 80), timeout=2).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stop(self) -> None:
        lines = _HOSTS.read_text().splitlines(keepends=True)
        _HOSTS.write_text("".join(line for line in lines if self._marker not in line))
        if self._server is not None:
            self._server.kill()
            self._server.wait(10)
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True, timeout=30, check=False)
        subprocess.run(["ip", "link", "del", f"{self._veth}h"], capture_output=True, timeout=30, check=False)
        shutil.rmtree(self.directory, ignore_errors=True)

    @staticmethod
    def _reap_stale() -> None:
        """A namespace and hosts entry a crashed run of this suite left behind."""
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30, check=False)
        for line in listed.stdout.splitlines():
            name = line.split()[0] if line.split() else ""
            pid = name.removeprefix("execbox-eg-")
            if name.startswith("execbox-eg-") and pid.isdigit() and not Path(f"/proc/{pid}").exists():
                subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30, check=False)
                subprocess.run(["ip", "link", "del", f"veg{int(pid) % 100000}h"], capture_output=True, timeout=30, check=False)
        lines = _HOSTS.read_text().splitlines(keepends=True)
        kept = [line for line in lines if "# execbox egress test" not in line or Path(f"/proc/{line.split()[-1]}").exists()]
        if kept != lines:
            _HOSTS.write_text("".join(kept))
