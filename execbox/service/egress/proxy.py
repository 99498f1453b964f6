"""The egress proxy: one listening UNIX socket per sandbox, one decision per connection.

It runs in the service's process, on an asyncio loop of its own in one daemon thread (so
it serves the same whatever event loop, if any, its caller runs). A backend opens a port
(:meth:`EgressProxy.open`) when it builds a sandbox, long before any request; the
executor attaches the execution to that port for the length of its run
(:meth:`EgressProxy.session`) with the execution's rules. A connection on a port without
an attached execution is refused.

Per connection: read the request head (:mod:`.http`), match the host the client asked
for against the rules, count it against the execution's connection cap, resolve the
name here (never in the sandbox), keep only the addresses the rules permit (public ones,
or those inside an IP/CIDR rule), connect to one of those very addresses (no second
resolution), then carry bytes both ways until either side ends, the execution's byte cap
or the connection's time cap is reached, or the execution ends. A refusal is an HTTP
``403`` (policy) or ``400``/``502``/``504`` (a bad request, an unreachable host) with a
one-line reason. Every attempt ends as one JSON line on the ``execbox.egress`` logger and
in the counters of :meth:`EgressProxy.stats`.

Only processes of sandbox uids (and root: gVisor's sentry connects for its sandboxes)
may use a port: the peer's uid is checked on every connection, and the directory of
ports cannot be listed by other users.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import ipaddress
import json
import logging
import shutil
import socket
import struct
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from execbox.egress_rules import EgressRule, address_permitted, match_host
from execbox.isolation.base import EgressPorts
from execbox.isolation.owners import is_orphan
from execbox.runtimes.base import EGRESS_SOCKET_NAME
from execbox.service.egress.http import (
    MAX_HEAD_BYTES,
    ProxyRequest,
    Refusal,
    parse_head,
    refusal_response,
)
from execbox.settings import Settings

__all__ = ["EGRESS_PORTS_DIR", "EgressCaps", "EgressProxy", "EgressStats", "ports_in_use"]

log = logging.getLogger("execbox.egress")

#: host-wide directory of the ports (a tmpfs: emptied at boot); one entry per sandbox
EGRESS_PORTS_DIR = Path("/run/execbox/egress")
#: how long a client may take to send its request head, and a name to resolve or an address to answer
_HEAD_TIMEOUT_S = 10.0
_RESOLVE_TIMEOUT_S = 10.0
_CONNECT_TIMEOUT_S = 10.0
_CHUNK = 64 << 10
_ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"


@dataclass(frozen=True)
class EgressCaps:
    """What one execution may do through the proxy."""

    connections: int
    bytes: int
    connection_time_s: float

    @classmethod
    def from_settings(cls, settings: Settings) -> EgressCaps:
        return cls(settings.egress_max_connections, settings.egress_max_bytes, settings.egress_max_connection_time)


@dataclass
class EgressStats:
    """Counters since start: attempts by outcome, bytes carried each way."""

    allowed: int = 0
    refused: int = 0
    failed: int = 0
    bytes_up: int = 0
    bytes_down: int = 0


@dataclass
class _Execution:
    """The execution attached to one port, and what it has used."""

    execution_id: str
    rules: tuple[EgressRule, ...]
    #: the context the execution was attached in (its log lines carry that request's id)
    context: contextvars.Context | None = None
    connections: int = 0
    bytes: int = 0
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


class _CapReached(Exception):
    pass


class EgressProxy(EgressPorts):
    """See the module docstring. ``start`` before the first ``open``; ``shutdown`` at the end."""

    def __init__(
        self,
        caps: EgressCaps,
        *,
        uids: range,
        ports_dir: Path = EGRESS_PORTS_DIR,
    ) -> None:
        self._caps = caps
        self._uids = uids
        self._dir = ports_dir
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._servers: dict[str, asyncio.AbstractServer] = {}
        self._attached: dict[str, _Execution] = {}
        self._lock = threading.Lock()
        self._stats = EgressStats()

    @property
    def directory(self) -> Path:
        return self._dir

    # -- lifecycle (any thread) --------------------------------------------------------

    def start(self) -> None:
        """Start the proxy's loop; remove the ports a dead execbox process left behind."""
        self._dir.mkdir(parents=True, exist_ok=True)
        self._dir.chmod(0o711)  # sandboxes traverse it; nobody lists it
        for entry in self._dir.iterdir():
            if is_orphan(entry.name):
                shutil.rmtree(entry, ignore_errors=True)
        self._thread = threading.Thread(target=self._loop.run_forever, name="execbox-egress", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        """Close every port and connection, stop the loop."""
        for key in list(self._servers):
            self.close(key)
        if self._thread is not None:
            with contextlib.suppress(TimeoutError):
                self._call(_cancel_all())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._thread = None
        if not self._loop.is_running():
            self._loop.close()

    def _call(self, coro: Any, timeout_s: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    # -- EgressPorts ---------------------------------------------------------------------

    def open(self, key: str) -> Path:
        directory = self._dir / key
        directory.mkdir(mode=0o755)
        directory.chmod(0o755)
        path = directory / EGRESS_SOCKET_NAME
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(path))
            path.chmod(0o666)  # sandbox uids connect; the peer's uid is checked on accept
            sock.listen(128)
            sock.setblocking(False)

            async def serve() -> asyncio.AbstractServer:
                return await asyncio.start_unix_server(
                    lambda r, w: self._handle(key, r, w), sock=sock, limit=MAX_HEAD_BYTES
                )

            server = self._call(serve())
        except BaseException:
            sock.close()
            shutil.rmtree(directory, ignore_errors=True)
            raise
        with self._lock:
            self._servers[key] = server
        return directory

    def close(self, key: str) -> None:
        with self._lock:
            server = self._servers.pop(key, None)
            execution = self._attached.pop(key, None)
        if execution is not None:
            self._cancel(execution)
        if server is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: so is the server
                self._loop.call_soon_threadsafe(server.close)
        shutil.rmtree(self._dir / key, ignore_errors=True)

    # -- executions ----------------------------------------------------------------------

    def session(
        self, key: str | None, execution_id: str, rules: Sequence[EgressRule]
    ) -> contextlib.AbstractContextManager[None]:
        """Attach an execution (its id and rules) to the port ``key`` while it runs; on exit
        its connections end. Without rules or a port, nothing is attached. The caller's
        context is kept for the log lines (the request id of the request being served)."""
        if key is None or not rules:
            return contextlib.nullcontext()
        return self._attached_while(key, _Execution(execution_id, tuple(rules), contextvars.copy_context()))

    @contextlib.contextmanager
    def _attached_while(self, key: str, execution: _Execution) -> Iterator[None]:
        with self._lock:
            self._attached[key] = execution
        try:
            yield
        finally:
            with self._lock:
                if self._attached.get(key) is execution:
                    del self._attached[key]
            self._cancel(execution)

    def _cancel(self, execution: _Execution) -> None:
        def cancel() -> None:
            for task in list(execution.tasks):
                task.cancel()

        with contextlib.suppress(RuntimeError):  # the loop is closed: nothing is running
            self._loop.call_soon_threadsafe(cancel)

    def stats(self) -> EgressStats:
        """A copy of the counters (for /metrics)."""
        with self._lock:
            return EgressStats(**self._stats.__dict__)

    # -- one connection (the proxy's loop) ----------------------------------------------------

    async def _handle(self, key: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        started = time.monotonic()
        record: dict[str, Any] = {"sandbox_id": key, "execution_id": None, "decision": "refused", "method": None,
                                  "host": None, "port": None, "address": None, "status": 403,
                                  "bytes_up": 0, "bytes_down": 0, "reason": None}  # fmt: skip
        execution: _Execution | None = None
        task = asyncio.current_task()
        upstream: asyncio.StreamWriter | None = None
        try:
            with self._lock:
                execution = self._attached.get(key)
            if execution is not None and task is not None:
                record["execution_id"] = execution.execution_id
                execution.tasks.add(task)  # type: ignore[arg-type]
            request = await self._read_request(reader)
            record.update(method=request.method, host=request.host, port=request.port)
            self._check_peer(writer)
            if execution is None:
                raise Refusal(403, "egress is off for this execution")
            address, up_reader, upstream = await self._connect(execution, request)
            record.update(address=str(address), decision="allowed", status=200)
            if request.tunnel:
                writer.write(_ESTABLISHED)
            else:
                upstream.write(request.head)
                record["bytes_up"] += len(request.head)
                execution.bytes += len(request.head)
            record["reason"] = await self._relay(execution, reader, writer, up_reader, upstream, record)
        except Refusal as refusal:
            record.update(status=refusal.status, reason=refusal.reason)
            record["decision"] = "failed" if refusal.status >= 500 else "refused"
            with contextlib.suppress(OSError, RuntimeError):
                writer.write(refusal_response(refusal.status, refusal.reason))
                await writer.drain()
        except asyncio.CancelledError:
            record["reason"] = "the execution ended"
        except (OSError, asyncio.IncompleteReadError) as exc:
            record["reason"] = f"connection lost: {exc}"
        finally:
            if execution is not None and task is not None:
                execution.tasks.discard(task)  # type: ignore[arg-type]
            for stream in (writer, upstream):
                if stream is not None:
                    stream.close()
            self._count(record, started, execution)

    def _check_peer(self, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        _, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
        if uid != 0 and uid not in self._uids:
            raise Refusal(403, f"uid {uid} is not a sandbox's")

    async def _read_request(self, reader: asyncio.StreamReader) -> ProxyRequest:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _HEAD_TIMEOUT_S)
        except TimeoutError:
            raise Refusal(408, "no request head in time") from None
        except asyncio.LimitOverrunError:
            raise Refusal(400, f"request head above {MAX_HEAD_BYTES} bytes") from None
        return parse_head(head)

    async def _connect(
        self, execution: _Execution, request: ProxyRequest
    ) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, asyncio.StreamReader, asyncio.StreamWriter]:
        """Decide, resolve, check the addresses, connect to one of them."""
        where = f"{request.host}:{request.port}"
        if match_host(execution.rules, request.host, request.port) is None:
            raise Refusal(403, f"{where} is not in this execution's egress allowlist")
        if execution.connections >= self._caps.connections:
            raise Refusal(403, f"this execution has used its {self._caps.connections} connections")
        execution.connections += 1
        addresses = await self._resolve(request.host, request.port)
        permitted = [a for a in addresses if address_permitted(execution.rules, a, request.port)]
        if not permitted:
            raise Refusal(403, f"{request.host} resolves to {addresses[0]}, a non-public address no IP/CIDR rule allows")
        failure = ""
        for address in permitted:
            plain = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped else address
            family = socket.AF_INET if plain.version == 4 else socket.AF_INET6
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                await asyncio.wait_for(self._loop.sock_connect(sock, (str(plain), request.port)), _CONNECT_TIMEOUT_S)
                up_reader, upstream = await asyncio.open_connection(sock=sock, limit=_CHUNK)
                return plain, up_reader, upstream
            except (OSError, TimeoutError) as exc:
                sock.close()
                failure = str(exc) or "timed out"
        raise Refusal(502, f"cannot connect to {where}: {failure}")

    async def _resolve(self, host: str, port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        """Every address of ``host``, in the resolver's order (an IP literal: itself)."""
        with contextlib.suppress(ValueError):
            return [ipaddress.ip_address(host)]
        try:
            infos = await asyncio.wait_for(
                self._loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP),
                _RESOLVE_TIMEOUT_S,
            )
        except (OSError, TimeoutError) as exc:
            raise Refusal(502, f"cannot resolve {host}: {exc}") from None
        addresses = []
        for info in infos:
            with contextlib.suppress(ValueError):
                address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
                if address not in addresses:
                    addresses.append(address)
        if not addresses:
            raise Refusal(502, f"{host} has no address")
        return addresses

    async def _relay(
        self,
        execution: _Execution,
        client_reader: asyncio.StreamReader,
        client: asyncio.StreamWriter,
        up_reader: asyncio.StreamReader,
        upstream: asyncio.StreamWriter,
        record: dict[str, Any],
    ) -> str:
        """Carry bytes both ways until both ends finish or a cap is reached; returns how it ended."""
        up = asyncio.ensure_future(self._copy(execution, client_reader, upstream, record, "bytes_up"))
        down = asyncio.ensure_future(self._copy(execution, up_reader, client, record, "bytes_down"))
        try:
            done, pending = await asyncio.wait(
                {up, down}, timeout=self._caps.connection_time_s, return_when=asyncio.FIRST_EXCEPTION
            )
        finally:
            for copy in (up, down):
                copy.cancel()
        for copy in done:
            if isinstance(copy.exception(), _CapReached):
                return f"closed at the cap of {self._caps.bytes} bytes per execution"
            if copy.exception() is not None:
                return f"connection lost: {copy.exception()}"
        if pending:
            return f"closed at the cap of {self._caps.connection_time_s:g} s per connection"
        return "done"

    async def _copy(
        self,
        execution: _Execution,
        source: asyncio.StreamReader,
        sink: asyncio.StreamWriter,
        record: dict[str, Any],
        counter: str,
    ) -> None:
        while data := await source.read(_CHUNK):
            if execution.bytes + len(data) > self._caps.bytes:
                raise _CapReached()
            execution.bytes += len(data)
            record[counter] += len(data)
            sink.write(data)
            await sink.drain()
        if sink.can_write_eof():
            with contextlib.suppress(OSError):
                sink.write_eof()

    def _count(self, record: dict[str, Any], started: float, execution: _Execution | None) -> None:
        record["duration_ms"] = round((time.monotonic() - started) * 1000, 3)
        with self._lock:
            stats = self._stats
            setattr(stats, record["decision"], getattr(stats, record["decision"]) + 1)
            stats.bytes_up += record["bytes_up"]
            stats.bytes_down += record["bytes_down"]
        line = partial(log.info, "egress %s", json.dumps(record), extra={"egress": record, "summary": "egress"})
        if execution is not None and execution.context is not None:
            execution.context.run(line)
        else:
            line()


async def _cancel_all() -> None:
    """End every connection still being served (at shutdown)."""
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def ports_in_use(ports_dir: Path = EGRESS_PORTS_DIR) -> list[str]:
    """The keys of the ports open on this host (for tests and leftovers checks)."""
    return sorted(entry.name for entry in ports_dir.iterdir()) if ports_dir.is_dir() else []

