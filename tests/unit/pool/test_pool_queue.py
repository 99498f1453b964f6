"""SandboxPool's bounded wait queue (``queue_max``): a lease that cannot even queue is refused at once."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest
from test_pool import TIMEOUT_S, FakeFactory, eventually, run, threads  # noqa: F401 (threads: a fixture)

from execbox.errors import PoolBusyError, QueueFullError
from execbox.pool import SandboxPool


def test_a_lease_beyond_the_queue_is_refused_at_once(threads: ThreadPoolExecutor) -> None:  # noqa: F811
    """One sandbox, a queue of two: the first lease gets the sandbox, two wait, the fourth is
    refused without waiting (the lease's own wait is far longer than the test)."""
    factory = FakeFactory()

    async def scenario() -> None:
        pool = SandboxPool("fake", factory, 1, threads, max_live=1, queue_max=2)
        pool.start()
        held = await pool.lease(TIMEOUT_S)
        waiting = [asyncio.create_task(pool.lease(TIMEOUT_S)) for _ in range(2)]
        await eventually(lambda: pool.stats().waiting == 2)
        with pytest.raises(QueueFullError, match="2 requests already wait"):
            await pool.lease(3600.0)  # answered at once, or the test times out
        assert isinstance(QueueFullError("x"), PoolBusyError)  # callers that handle busy handle it too
        assert pool.stats().waiting == 2  # the refused lease never joined the queue
        pool.release(held)
        first = await waiting[0]
        pool.release(first)
        second = await waiting[1]
        pool.release(second)
        await pool.close()

    run(scenario)


def test_the_queue_admits_again_once_a_waiter_is_served(threads: ThreadPoolExecutor) -> None:  # noqa: F811
    factory = FakeFactory()

    async def scenario() -> None:
        pool = SandboxPool("fake", factory, 1, threads, max_live=1, queue_max=1)
        pool.start()
        held = await pool.lease(TIMEOUT_S)
        waiter = asyncio.create_task(pool.lease(TIMEOUT_S))
        await eventually(lambda: pool.stats().waiting == 1)
        with pytest.raises(QueueFullError):
            await pool.lease(TIMEOUT_S)
        pool.release(held)
        served = await waiter
        assert pool.stats().waiting == 0
        again = asyncio.create_task(pool.lease(TIMEOUT_S))  # the queue has room again
        await eventually(lambda: pool.stats().waiting == 1)
        pool.release(served)
        pool.release(await again)
        await pool.close()

    run(scenario)


def test_a_queue_of_zero_waits_for_nothing_but_a_ready_sandbox_is_still_leased(
    threads: ThreadPoolExecutor,  # noqa: F811
) -> None:
    factory = FakeFactory()

    async def scenario() -> None:
        pool = SandboxPool("fake", factory, 1, threads, max_live=1, queue_max=0)
        pool.start()
        assert await pool.wait_ready(TIMEOUT_S)
        held = await pool.lease(TIMEOUT_S)  # a ready sandbox needs no queue
        with pytest.raises(QueueFullError):
            await pool.lease(3600.0)
        pool.release(held)
        await pool.close()

    run(scenario)


def test_no_bound_by_default(threads: ThreadPoolExecutor) -> None:  # noqa: F811
    factory = FakeFactory()

    async def scenario() -> None:
        pool = SandboxPool("fake", factory, 1, threads, max_live=1)
        pool.start()
        held = await pool.lease(TIMEOUT_S)
        waiting = [asyncio.create_task(pool.lease(TIMEOUT_S)) for _ in range(20)]
        await eventually(lambda: pool.stats().waiting == 20)
        pool.release(held)
        for task in waiting:
            pool.release(await task)
        await pool.close()

    run(scenario)
