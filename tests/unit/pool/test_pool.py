"""SandboxPool with a fake Sandbox and factory: leasing, waiters, busy, replacement, retries."""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import pytest

from execbox.errors import PoolBusyError, PoolClosedError, SandboxStartError
from execbox.isolation.base import RunOutcome, Sandbox
from execbox.models import ExecutionRequest, Limits
from execbox.pool import SandboxPool

T = TypeVar("T")
TIMEOUT_S = 10.0  # generous: only there so that a broken pool fails instead of hanging


class FakeSandbox(Sandbox):
    backend_name = "fake"

    def __init__(self, sandbox_id: str) -> None:
        super().__init__(spec=None, sandbox_id=sandbox_id)  # type: ignore[arg-type]
        self.is_alive = True
        self.destroyed = threading.Event()

    def run(self, request: ExecutionRequest, limits: Limits) -> RunOutcome:
        raise NotImplementedError

    def open_workspace(self) -> int:
        raise NotImplementedError

    def alive(self) -> bool:
        return self.is_alive and not self.destroyed.is_set()

    def destroy(self) -> None:
        self.destroyed.set()


class FakeFactory:
    """Builds FakeSandboxes; can be gated (blocks until opened) and made to fail."""

    def __init__(self) -> None:
        self.counter = itertools.count(1)
        self.created: list[FakeSandbox] = []
        self.gate = threading.Semaphore(0)
        self.gated = False
        self.failures_left = 0
        self.calls = 0
        self.lock = threading.Lock()

    def __call__(self) -> Sandbox:
        with self.lock:
            self.calls += 1
        if self.gated:
            assert self.gate.acquire(timeout=TIMEOUT_S), "the test never opened the factory gate"
        with self.lock:
            if self.failures_left:
                self.failures_left -= 1
                raise SandboxStartError("fake: cannot build")
            sandbox = FakeSandbox(f"fake-{next(self.counter)}")
            self.created.append(sandbox)
            return sandbox


@pytest.fixture
def threads() -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(max_workers=8)
    yield pool
    pool.shutdown(wait=True, cancel_futures=True)


def run(coro_fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
    return asyncio.run(asyncio.wait_for(coro_fn(), TIMEOUT_S * 3))


async def eventually(condition: Callable[[], bool]) -> None:
    for _ in range(int(TIMEOUT_S / 0.005)):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition never became true")


def test_lease_gives_a_ready_sandbox_and_release_destroys_and_replaces_it(threads: ThreadPoolExecutor) -> None:
    factory = FakeFactory()

    async def scenario() -> None:
        pool = SandboxPool("fake", factory, 1, threads)
        pool.start()
        assert await pool.wait_ready(TIMEOUT_S)
        assert pool.stats().ready == 1
        sandbox = await pool.lease(TIMEOUT_S)
        assert sandbox is factory.created[0]
        assert pool.stats().leased == 1
        await eventually(lambda: pool.stats().ready == 1)  # replenished while leased
        pool.release(sandbox)
        await eventually(sandbox.destroyed.is_set)  # used once, never reused
        assert pool.stats().leased == 0
        second = await pool.lease(TIMEOUT_S)
        assert second is not sandbox and not second.destroyed.is_set()
        pool.release(second)
        await pool.close()
        assert all(s.destroyed.is_set() for s in factory.created)
        assert pool.stats().created_total == len(factory.created)

    run(scenario)


def test_waiters_are_served_first_come_first_served(threads: ThreadPoolExecutor) -> None:
    factory = FakeFactory()
    factory.gated = True

    async def scenario() -> None:
        pool = SandboxPool("fake", factory, 0, threads, max_live=1)
        pool.start()
        order: list[str] = []

        async def client(name: str) -> None:
            sandbox = await pool.lease(TIMEOUT_S)
            order.append(name)
            await asyncio.sleep(0.01)
            pool.release(sandbox)

        tasks = []
        for name in ("first", "second", "third"):
            tasks.append(asyncio.create_task(client(name)))
            await eventually(lambda n=len(tasks): pool.stats().waiting == n)
        for _ in range(3):
            factory.gate.release()
        await asyncio.gather(*tasks)
        assert order == ["first", "second", "third"]
        await pool.close()

    run(scenario)


def test_busy_after_the_wait_time(threads: ThreadPoolExecutor) -> None:
    factory = FakeFactory()

    async def scenario() -> None:
        pool = SandboxPool("fake", factory, 1, threads, max_live=1)
        pool.start()
        held = await pool.lease(TIMEOUT_S)
        with pytest.raises(PoolBusyError):
            await pool.lease(0.05)
        assert pool.stats().waiting == 0  # the timed-out waiter is gone
        pool.release(held)
        again = await pool.lease(TIMEOUT_S)  # and the pool still serves afterwards
        pool.release(again)
        await pool.close()

    run(scenario)


def test_busy_while_a_sandbox_is_still_being_built(threads: ThreadPoolExecutor) -> None:
    factory = FakeFactory()
    factory.gated = True

    async def scenario() -> None:
        pool = SandboxPool("fake", factory, 1, threads)
        pool.start()
        with pytest.raises(PoolBusyError):
            await pool.lease(0.05)
        for _ in range(4):
            factory.gate.release()
        await pool.close()

    run(scenario)


def test_a_dead_ready_sandbox_is_replaced(threads: ThreadPoolExecutor) -> None:
    factory = FakeFactory()

    async def scenario() -> None:
        pool = SandboxPool("fake", factory, 1, threads)
        pool.start()
        assert await pool.wait_ready(TIMEOUT_S)
        dead = factory.created[0]
        dead.is_alive = False
        sandbox = await pool.lease(TIMEOUT_S)
        assert sandbox is not dead
        assert sandbox.alive()
        await eventually(dead.destroyed.is_set)
        pool.release(sandbox)
        await pool.close()

    run(scenario)


def test_a_failed_creation_is_retried(threads: ThreadPoolExecutor) -> None:
    factory = FakeFactory()
    factory.failures_left = 2

    async def scenario() -> None:
        pool = SandboxPool("fake", factory, 1, threads)
        pool.start()
        sandbox = await pool.lease(TIMEOUT_S)
        assert sandbox is factory.created[0]
        stats = pool.stats()
        assert stats.failed_total == 2
        assert stats.last_error is None  # cleared by the success
        assert factory.calls >= 3
        pool.release(sandbox)
        await pool.close()

    run(scenario)


def test_a_persistent_creation_failure_is_reported(threads: ThreadPoolExecutor) -> None:
    factory = FakeFactory()
    factory.failures_left = 10**6

    async def scenario() -> None:
        pool = SandboxPool("fake", factory, 1, threads)
        pool.start()
        await eventually(lambda: pool.stats().failed_total >= 1)
        assert "fake: cannot build" in (pool.stats().last_error or "")
        with pytest.raises(SandboxStartError, match="fake: cannot build"):
            await pool.lease(0.3)
        await pool.close()

    run(scenario)


def test_close_fails_waiters_and_refuses_leases(threads: ThreadPoolExecutor) -> None:
    factory = FakeFactory()
    factory.gated = True

    async def scenario() -> None:
        pool = SandboxPool("fake", factory, 0, threads, max_live=1)
        pool.start()
        waiter = asyncio.create_task(pool.lease(TIMEOUT_S))
        await eventually(lambda: pool.stats().waiting == 1)
        closing = asyncio.create_task(pool.close())
        with pytest.raises(PoolClosedError):
            await waiter
        factory.gate.release()  # let the build in flight finish: it is destroyed, not handed out
        await closing
        assert all(s.destroyed.is_set() for s in factory.created)
        with pytest.raises(PoolClosedError):
            await pool.lease(TIMEOUT_S)

    run(scenario)


def test_live_sandboxes_are_bounded(threads: ThreadPoolExecutor) -> None:
    factory = FakeFactory()

    async def scenario() -> None:
        pool = SandboxPool("fake", factory, 2, threads, max_live=3)
        pool.start()
        leased = [await pool.lease(TIMEOUT_S) for _ in range(3)]
        with pytest.raises(PoolBusyError):
            await pool.lease(0.05)
        live = [s for s in factory.created if not s.destroyed.is_set()]
        assert len(live) <= 3
        for sandbox in leased:
            pool.release(sandbox)
        await pool.close()

    run(scenario)


def test_a_cancelled_lease_does_not_lose_the_sandbox(threads: ThreadPoolExecutor) -> None:
    factory = FakeFactory()
    factory.gated = True

    async def scenario() -> None:
        pool = SandboxPool("fake", factory, 0, threads, max_live=1)
        pool.start()
        task = asyncio.create_task(pool.lease(TIMEOUT_S))
        await eventually(lambda: pool.stats().waiting == 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        factory.gate.release()
        factory.gate.release()
        await eventually(lambda: pool.stats().creating == 0)
        assert pool.stats().leased == 0
        await pool.close()

    run(scenario)
