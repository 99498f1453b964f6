"""Quotas shared through a real Redis (a throwaway redis-server on loopback): replicas count one
rate and one set of slots; a crashed replica's slots expire; a running one's are renewed; no
Redis is a clear UnavailableError (fail closed)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest

from execbox.errors import LimitExceededError, UnavailableError
from execbox.service.quotas import Quotas
from test_quotas import admitted, cancelled_execution_gives_its_slot_back

from tests.redis_server import free_port, redis_for_tests

T = TypeVar("T")
TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    yield from redis_for_tests(__name__)


def run(coro_fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
    return asyncio.run(asyncio.wait_for(coro_fn(), TIMEOUT_S))


def test_two_replicas_count_one_rate(redis_url: str) -> None:
    async def scenario() -> None:
        first, second = (Quotas(key_rate=(4, 60.0), redis_url=redis_url) for _ in range(2))
        assert first.store == "redis"
        for replica in (first, second, first, second):
            await admitted(replica, "rate-alice")
        for replica in (first, second):
            with pytest.raises(LimitExceededError) as caught:
                await admitted(replica, "rate-alice")
            assert 30 <= caught.value.retry_after_s <= 60
        await admitted(second, "rate-bob")
        await first.close()
        await second.close()

    run(scenario)


def test_two_replicas_share_the_slots(redis_url: str) -> None:
    async def scenario() -> None:
        first, second = (Quotas(key_max_concurrent=2, redis_url=redis_url) for _ in range(2))
        async with first.admit("slots-alice"), second.admit("slots-alice"):
            for replica in (first, second):
                with pytest.raises(LimitExceededError, match="already runs 2"):
                    await admitted(replica, "slots-alice")
            await admitted(first, "slots-bob")  # another key is not held back
        await admitted(second, "slots-alice")  # both came back
        await first.close()
        await second.close()

    run(scenario)


def test_a_cancelled_execution_gives_its_slot_back(redis_url: str) -> None:
    async def scenario() -> None:
        quotas = Quotas(key_max_concurrent=1, redis_url=redis_url)
        await cancelled_execution_gives_its_slot_back(quotas, "cancel-alice")
        await quotas.close()

    run(scenario)


async def _eventually_admitted(quotas: Quotas, caller: str, within_s: float) -> None:
    deadline = asyncio.get_running_loop().time() + within_s
    while True:
        try:
            await admitted(quotas, caller)
            return
        except LimitExceededError:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.05)


def test_a_crashed_replicas_slot_expires(redis_url: str) -> None:
    async def scenario() -> None:
        crashed = Quotas(key_max_concurrent=1, redis_url=redis_url, lease_s=0.6)
        survivor = Quotas(key_max_concurrent=1, redis_url=redis_url, lease_s=0.6)
        held = crashed.admit("crash-alice")
        await held.__aenter__()
        with pytest.raises(LimitExceededError):
            await admitted(survivor, "crash-alice")
        # the replica dies: no renewal, no release (its process is gone)
        renewer = crashed._slots._renewer  # type: ignore[union-attr]
        assert renewer is not None
        renewer.cancel()
        crashed._slots._held.clear()  # type: ignore[union-attr]
        await _eventually_admitted(survivor, "crash-alice", within_s=10.0)
        await crashed.close()
        await survivor.close()

    run(scenario)


def test_a_running_replicas_slot_is_renewed(redis_url: str) -> None:
    async def scenario() -> None:
        runner = Quotas(key_max_concurrent=1, redis_url=redis_url, lease_s=0.6)
        other = Quotas(key_max_concurrent=1, redis_url=redis_url, lease_s=0.6)
        async with runner.admit("renew-alice"):
            for _ in range(3):  # three leases long, renewed every 0.2 s
                await asyncio.sleep(0.6)
                with pytest.raises(LimitExceededError):
                    await admitted(other, "renew-alice")
        await admitted(other, "renew-alice")
        await runner.close()
        await other.close()

    run(scenario)


def test_no_redis_fails_closed() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there

    async def scenario() -> None:
        rate = Quotas(key_rate=(10, 60.0), redis_url=url)
        with pytest.raises(UnavailableError, match="quota store .*does not answer") as caught:
            await admitted(rate, "alice")
        assert caught.value.retry_after_s > 0
        slots = Quotas(key_max_concurrent=1, redis_url=url)
        with pytest.raises(UnavailableError):
            await admitted(slots, "alice")
        address = Quotas(client_rate=(10, 60.0), redis_url=url)
        with pytest.raises(UnavailableError):
            await address.check_client("127.0.0.1")
        unused = Quotas(redis_url=url)  # no quota set: Redis is never asked
        assert unused.store == "none"
        await admitted(unused, "alice")
        for quotas in (rate, slots, address, unused):
            await quotas.close()

    run(scenario)
