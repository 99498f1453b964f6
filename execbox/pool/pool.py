"""Warm sandboxes per runtime: lease with a deadline, background replenish, health.

Each sandbox serves exactly one execution and is then destroyed; the pool keeps
``size`` sandboxes ready so that a request normally pays only for running its code.
Requests that find none wait first come, first served, up to their deadline. At most
``max_live`` sandboxes (ready + leased + being built) exist at once, which bounds the
memory a burst can take. At most ``queue_max`` requests wait at once (None: no bound); one
more is refused at once with QueueFullError, so that a burst is answered instead of piling
up until its wait runs out. Sandbox work (create, destroy) runs in worker threads: the
event loop never blocks on it.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

from execbox.errors import (
    ExecboxError,
    PoolBusyError,
    PoolClosedError,
    QueueFullError,
    SandboxStartError,
)
from execbox.isolation.base import Sandbox

__all__ = ["PoolStats", "SandboxPool"]

log = logging.getLogger("execbox.pool")

_RETRY_DELAYS_S = (0.1, 0.5, 1.0, 2.0, 5.0)


@dataclass(frozen=True)
class PoolStats:
    name: str
    size: int
    ready: int
    leased: int
    creating: int
    waiting: int
    created_total: int
    failed_total: int
    last_error: str | None
    #: sandboxes destroyed after the execution they served
    recycled_total: int = 0


class SandboxPool:
    """Ready sandboxes of one kind (runtime x backend)."""

    def __init__(
        self, name: str, factory: Callable[[], Sandbox], size: int, threads: Executor, max_live: int | None = None,
        queue_max: int | None = None,
    ) -> None:
        self.name = name
        self.size = size
        self.queue_max = queue_max
        self.max_live = max(max_live or 2 * size, 1)
        self._factory = factory
        self._threads = threads
        self._ready: collections.deque[Sandbox] = collections.deque()
        self._waiters: collections.deque[asyncio.Future[Sandbox]] = collections.deque()
        self._creating = 0
        self._leased = 0
        self._created_total = 0
        self._failed_total = 0
        self._recycled_total = 0
        self._consecutive_failures = 0
        self._last_error: str | None = None
        self._closed = False
        self._retry: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Future[object]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._fill()

    async def wait_ready(self, timeout_s: float) -> bool:
        """Wait until at least one sandbox is ready (or the pool has size 0)."""
        deadline = time.monotonic() + timeout_s
        while self.size and not self._ready and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return not self.size or bool(self._ready)

    async def close(self) -> None:
        """Stop taking leases, fail the waiters, destroy every ready sandbox, wait for the rest."""
        self._closed = True
        if self._retry:
            self._retry.cancel()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(PoolClosedError(f"pool {self.name} is closing"))
        while self._ready:
            self._destroy(self._ready.popleft())
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # -- leasing ------------------------------------------------------------------------

    async def lease(self, timeout_s: float) -> Sandbox:
        """A ready sandbox, for one execution; PoolBusyError after ``timeout_s``, QueueFullError
        at once when none is ready and ``queue_max`` leases already wait."""
        if self._closed:
            raise PoolClosedError(f"pool {self.name} is closing")
        while self._ready:
            sandbox = self._ready.popleft()
            if sandbox.alive():
                self._leased += 1
                self._fill()
                return sandbox
            log.warning("sandbox %s of pool %s died while ready; replacing it", sandbox.id, self.name)
            self._failed_total += 1
            self._destroy(sandbox)
        assert self._loop is not None, "pool not started"
        if self.queue_max is not None and sum(1 for w in self._waiters if not w.done()) >= self.queue_max:
            raise QueueFullError(f"{self.queue_max} requests already wait for a {self.name} sandbox (the queue is full)")
        waiter: asyncio.Future[Sandbox] = self._loop.create_future()
        self._waiters.append(waiter)
        self._fill()
        try:
            return await asyncio.wait_for(asyncio.shield(waiter), timeout_s)
        except TimeoutError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                return waiter.result()  # handed over at the last moment
            waiter.cancel()
            if self._consecutive_failures and self._last_error:
                raise SandboxStartError(f"pool {self.name} cannot build sandboxes: {self._last_error}") from None
            raise PoolBusyError(f"no {self.name} sandbox free within {timeout_s:g}s") from None
        except BaseException:
            # cancelled (e.g. the client went away): a sandbox handed over meanwhile goes back
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self.release(waiter.result())
            waiter.cancel()
            raise
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def release(self, sandbox: Sandbox) -> None:
        """Give back a leased sandbox: it is destroyed (never reused) and replaced."""
        self._leased -= 1
        self._recycled_total += 1
        self._destroy(sandbox)
        self._fill()

    # -- internals ----------------------------------------------------------------------

    def _track(self, future: asyncio.Future[object]) -> None:
        self._tasks.add(future)
        future.add_done_callback(self._tasks.discard)

    def _destroy(self, sandbox: Sandbox) -> None:
        assert self._loop is not None
        future = self._loop.run_in_executor(self._threads, sandbox.destroy)
        future.add_done_callback(lambda f: f.exception() and log.error("destroying %s: %s", sandbox.id, f.exception()))
        self._track(future)

    def _fill(self) -> None:
        """Start building sandboxes until ready + building covers the target and the waiters."""
        if self._closed or self._loop is None or self._retry is not None:
            return
        live_waiters = sum(1 for w in self._waiters if not w.done())
        while (
            len(self._ready) + self._creating < self.size + live_waiters
            and len(self._ready) + self._creating + self._leased < self.max_live
        ):
            self._creating += 1
            future = self._loop.run_in_executor(self._threads, self._factory)
            future.add_done_callback(self._on_created)
            self._track(future)

    def _on_created(self, future: asyncio.Future[Sandbox]) -> None:
        self._creating -= 1
        error = future.exception() if not future.cancelled() else None
        if future.cancelled() or error is not None:
            self._failed_total += 1
            self._consecutive_failures += 1
            self._last_error = str(error) if error else "cancelled"
            if not isinstance(error, ExecboxError):
                log.exception("building a %s sandbox failed", self.name, exc_info=error)
            else:
                log.error("building a %s sandbox failed: %s", self.name, error)
            if not self._closed and self._loop is not None and self._retry is None:
                delay = _RETRY_DELAYS_S[min(self._consecutive_failures, len(_RETRY_DELAYS_S)) - 1]
                self._retry = self._loop.call_later(delay, self._retry_fill)
            return
        sandbox = future.result()
        self._created_total += 1
        self._consecutive_failures = 0
        self._last_error = None
        if self._closed:
            self._destroy(sandbox)
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._leased += 1
                waiter.set_result(sandbox)
                self._fill()
                return
        self._ready.append(sandbox)
        self._fill()

    def _retry_fill(self) -> None:
        self._retry = None
        self._fill()

    def stats(self) -> PoolStats:
        return PoolStats(
            name=self.name,
            size=self.size,
            ready=len(self._ready),
            leased=self._leased,
            creating=self._creating,
            waiting=sum(1 for w in self._waiters if not w.done()),
            created_total=self._created_total,
            failed_total=self._failed_total,
            last_error=self._last_error,
            recycled_total=self._recycled_total,
        )
