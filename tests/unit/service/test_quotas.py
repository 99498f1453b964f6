"""Quotas in-process: a caller's rate and concurrency, the per-address rate, slots given back on every path."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pytest

from execbox.errors import LimitExceededError
from execbox.service.quotas import Quotas
from execbox.settings import Settings

T = TypeVar("T")
TIMEOUT_S = 10.0


def run(coro_fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
    return asyncio.run(asyncio.wait_for(coro_fn(), TIMEOUT_S))


async def admitted(quotas: Quotas, caller: str | None) -> None:
    async with quotas.admit(caller):
        pass


def test_a_callers_rate_with_retry_after_from_the_window() -> None:
    async def scenario() -> None:
        quotas = Quotas(key_rate=(3, 60.0))
        for _ in range(3):
            await admitted(quotas, "alice")
        with pytest.raises(LimitExceededError, match="'alice' is over its rate of 3/minute") as caught:
            await admitted(quotas, "alice")
        assert 30 <= caught.value.retry_after_s <= 60  # when the oldest of the three leaves the window
        await admitted(quotas, "bob")  # another key has its own budget
        await quotas.close()

    run(scenario)


def test_callers_without_a_key_share_one_bucket() -> None:
    async def scenario() -> None:
        quotas = Quotas(key_rate=(2, 60.0))
        await admitted(quotas, None)
        await admitted(quotas, None)
        with pytest.raises(LimitExceededError, match="a caller without a key"):
            await admitted(quotas, None)
        await admitted(quotas, "anonymous")  # a key of that name is not the keyless bucket
        await quotas.close()

    run(scenario)


def test_concurrency_per_caller_does_not_hold_back_another() -> None:
    async def scenario() -> None:
        quotas = Quotas(key_max_concurrent=2)
        async with quotas.admit("alice"), quotas.admit("alice"):
            with pytest.raises(LimitExceededError, match="'alice' already runs 2 execution") as caught:
                await admitted(quotas, "alice")
            assert caught.value.retry_after_s >= 1
            async with quotas.admit("bob"), quotas.admit("bob"):
                pass
        async with quotas.admit("alice"), quotas.admit("alice"):  # both slots came back
            pass
        await quotas.close()

    run(scenario)


async def cancelled_execution_gives_its_slot_back(quotas: Quotas, caller: str) -> None:
    """A caller with one slot: an execution holding it is cancelled (the client went away),
    and the slot is free again."""
    entered = asyncio.Event()

    async def long_execution() -> None:
        async with quotas.admit(caller):
            entered.set()
            await asyncio.sleep(3600)

    task = asyncio.create_task(long_execution())
    await entered.wait()
    with pytest.raises(LimitExceededError):
        await admitted(quotas, caller)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await admitted(quotas, caller)


def test_a_slot_comes_back_after_an_error_and_after_cancellation() -> None:
    async def scenario() -> None:
        quotas = Quotas(key_max_concurrent=1)
        with pytest.raises(RuntimeError):
            async with quotas.admit("alice"):
                raise RuntimeError("the execution failed")
        await cancelled_execution_gives_its_slot_back(quotas, "alice")
        await quotas.close()

    run(scenario)


def test_a_refused_request_spends_nothing() -> None:
    """Refused for concurrency: no rate spent. Refused for rate: no slot kept."""
    async def scenario() -> None:
        quotas = Quotas(key_rate=(2, 60.0), key_max_concurrent=1)
        async with quotas.admit("alice"):  # rate 1 of 2
            with pytest.raises(LimitExceededError, match="already runs"):
                await admitted(quotas, "alice")
        await admitted(quotas, "alice")  # rate 2 of 2: the refusal above did not count
        with pytest.raises(LimitExceededError, match="rate"):
            await admitted(quotas, "alice")
        quotas_slots_free = Quotas(key_rate=(1, 60.0), key_max_concurrent=1)
        await admitted(quotas_slots_free, "bob")
        for _ in range(3):  # each refused by the rate, never by a slot the refusal kept
            with pytest.raises(LimitExceededError, match="rate"):
                await admitted(quotas_slots_free, "bob")
        await quotas.close()
        await quotas_slots_free.close()

    run(scenario)


def test_the_per_address_rate() -> None:
    async def scenario() -> None:
        quotas = Quotas(client_rate=(2, 1.0))
        await quotas.check_client("10.0.0.1")
        await quotas.check_client("10.0.0.1")
        with pytest.raises(LimitExceededError, match="this client address is over its rate of 2/second") as caught:
            await quotas.check_client("10.0.0.1")
        assert caught.value.retry_after_s == 1
        await quotas.check_client("10.0.0.2")
        await admitted(quotas, "alice")  # no key quota: the address rate is its own
        await quotas.close()

    run(scenario)


def test_no_quota_set_is_no_limit() -> None:
    async def scenario() -> None:
        quotas = Quotas.from_settings(Settings.load(env_file=None))
        assert quotas.store == "none"
        for _ in range(50):
            await quotas.check_client("10.0.0.1")
            await admitted(quotas, "alice")
        await quotas.close()

    run(scenario)


def test_from_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANDBOX_KEY_RATE", "2/second")
    monkeypatch.setenv("SANDBOX_KEY_MAX_CONCURRENT", "1")

    async def scenario() -> None:
        quotas = Quotas.from_settings(Settings.load(env_file=None))
        assert quotas.store == "memory"
        async with quotas.admit("alice"):
            with pytest.raises(LimitExceededError, match="SANDBOX_KEY_MAX_CONCURRENT"):
                await admitted(quotas, "alice")
        await admitted(quotas, "alice")
        with pytest.raises(LimitExceededError, match="2/second"):
            await admitted(quotas, "alice")
        await quotas.close()

    run(scenario)
