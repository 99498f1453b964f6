"""Quotas per caller: a request rate and a number of executions at once, in-process or in Redis.

A caller is an API key's name (or one anonymous bucket when keys are off or a request
came without one). :meth:`Quotas.admit` holds one concurrency slot of the caller for
the duration of an execution or a cell, after spending one unit of its rate, and
raises :class:`~execbox.errors.LimitExceededError` (with ``retry_after_s``) above
either; :meth:`Quotas.check_client` is the per-address rate (``SANDBOX_RATE_LIMIT``).

**Rates** use the ``limits`` library's *moving window*: a request is counted for exactly
one period after it was made, so no burst of twice the rate straddles a window
boundary (as a fixed window allows), and ``Retry-After`` is exact: the time until the
oldest counted request leaves the window. A refused request is not counted. Its cost is
one entry per counted request (at most the rate's amount per caller), which is small for
rates such as 600/minute. The window lives in memory, or in Redis with
``SANDBOX_REDIS_URL``, where every replica counts in the same window.

**Concurrency** has no library that does it: in-process it is a counter per caller; in
Redis it is a sorted set per caller of slot id -> lease expiry (Redis's own clock, so
replicas' clocks do not matter), taken and checked in one Lua script that first drops
expired slots. A replica renews the leases of its running slots every third of the lease
(``LEASE_S``); one that crashed stops renewing, and its slots expire within a lease, so a
crash cannot hold a caller's quota for good. A slot is given back on every path out of
``admit``, cancellation included; a give-back that cannot reach Redis expires instead.

**Redis unreachable** is :class:`~execbox.errors.UnavailableError` (503 with
``Retry-After``): the service fails closed rather than serve without its limits. A
request that needs no quota (none is set) never touches Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any, Protocol

from limits import RateLimitItemPerSecond
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.aio.strategies import MovingWindowRateLimiter
from limits.errors import StorageError
from redis.exceptions import RedisError

from execbox.errors import LimitExceededError, UnavailableError
from execbox.settings import Settings

__all__ = ["ANONYMOUS", "LEASE_S", "Quotas"]

log = logging.getLogger("execbox.quotas")

#: the bucket of callers without a key (not a valid key name, so no key shares it)
ANONYMOUS = "-anonymous"
#: how long a concurrency slot in Redis lives without renewal
LEASE_S = 30.0
#: Redis must answer within this, or the request gets 503
REDIS_TIMEOUT_S = 2.0
#: Retry-After when a caller is at its concurrency limit (a slot frees when an execution ends)
CONCURRENCY_RETRY_S = 1.0
KEY_PREFIX = "execbox"

_NOW_MS = """
if redis.replicate_commands then pcall(redis.replicate_commands) end
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""
#: KEYS[1] the caller's slots; ARGV: limit, lease_ms, slot id. 1 taken, 0 at the limit.
_ACQUIRE = _NOW_MS + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now_ms + tonumber(ARGV[2]), ARGV[3])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
return 1
"""
#: KEYS[1] the caller's slots; ARGV: lease_ms, slot ids. The number of slots still there.
_RENEW = _NOW_MS + """
local renewed = 0
for i = 2, #ARGV do
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) then
    redis.call('ZADD', KEYS[1], 'XX', now_ms + tonumber(ARGV[1]), ARGV[i])
    renewed = renewed + 1
  end
end
if renewed > 0 then redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1])) end
return renewed
"""


def _unavailable(exc: BaseException) -> UnavailableError:
    return UnavailableError(f"the quota store (Redis, SANDBOX_REDIS_URL) does not answer: {type(exc).__name__}: {exc}")


class _Slots(Protocol):
    async def acquire(self, bucket: str) -> str | None: ...

    async def release(self, bucket: str, slot: str) -> None: ...

    async def close(self) -> None: ...


class _LocalSlots:
    """Concurrency slots of this process."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._held: defaultdict[str, int] = defaultdict(int)

    async def acquire(self, bucket: str) -> str | None:
        if self._held[bucket] >= self.limit:
            return None
        self._held[bucket] += 1
        return bucket

    async def release(self, bucket: str, slot: str) -> None:
        self._held[bucket] -= 1
        if self._held[bucket] <= 0:
            del self._held[bucket]

    async def close(self) -> None:
        self._held.clear()


class _RedisSlots:
    """Concurrency slots shared by every replica: a sorted set of leases per caller."""

    def __init__(self, client: Any, limit: int, lease_s: float) -> None:
        self.limit = limit
        self.lease_ms = int(lease_s * 1000)
        self._client = client
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        self._held: defaultdict[str, set[str]] = defaultdict(set)
        self._renewer: asyncio.Task[None] | None = None
        self._prefix = f"{socket.gethostname()}:{os.getpid()}:"

    @staticmethod
    def _key(bucket: str) -> str:
        return f"{KEY_PREFIX}:slots:{bucket}"

    async def acquire(self, bucket: str) -> str | None:
        slot = self._prefix + uuid.uuid4().hex
        try:
            taken = await self._acquire(keys=[self._key(bucket)], args=[self.limit, self.lease_ms, slot])
        except (RedisError, OSError) as exc:
            raise _unavailable(exc) from exc
        if not taken:
            return None
        self._held[bucket].add(slot)
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.create_task(self._renew_forever())
        return slot

    async def release(self, bucket: str, slot: str) -> None:
        held = self._held.get(bucket)
        if held is not None:
            held.discard(slot)
            if not held:
                del self._held[bucket]
        try:
            await self._client.zrem(self._key(bucket), slot)
        except (RedisError, OSError) as exc:
            log.warning("could not give back a slot of %s (it expires within %gs): %s", bucket, self.lease_ms / 1000, exc)

    async def renew(self) -> None:
        """Extend the leases of every slot this process holds (called every third of a lease)."""
        for bucket, slots in list(self._held.items()):
            if not slots:
                continue
            try:
                renewed = await self._renew(keys=[self._key(bucket)], args=[self.lease_ms, *slots])
            except (RedisError, OSError) as exc:
                log.warning("could not renew the slots of %s: %s", bucket, exc)
                continue
            if renewed < len(slots):
                log.warning("%d slot(s) of %s had expired in Redis before renewal", len(slots) - renewed, bucket)

    async def _renew_forever(self) -> None:
        while self._held:
            await asyncio.sleep(self.lease_ms / 3000)
            await self.renew()

    async def close(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
        for bucket, slots in list(self._held.items()):
            for slot in list(slots):
                await self.release(bucket, slot)


class _Rate:
    """One rate (``amount`` per ``period_s``) over many buckets, on a ``limits`` storage."""

    def __init__(self, amount: int, period_s: float, limiter: MovingWindowRateLimiter, scope: str, setting: str) -> None:
        self.item = RateLimitItemPerSecond(amount, max(1, round(period_s)), namespace=KEY_PREFIX)
        self._limiter = limiter
        self._scope = scope
        self._setting = setting
        self.text = f"{amount}/{_period_text(period_s)}"

    async def hit(self, bucket: str, what: str, quota: str) -> None:
        try:
            if await self._limiter.hit(self.item, self._scope, bucket):
                return
            stats = await self._limiter.get_window_stats(self.item, self._scope, bucket)
        except StorageError as exc:
            raise _unavailable(exc.storage_error) from exc
        except (RedisError, OSError) as exc:
            raise _unavailable(exc) from exc
        retry_after_s = max(1, math.ceil(stats.reset_time - time.time()))
        raise LimitExceededError(f"{what} is over its rate of {self.text} ({self._setting})", retry_after_s, quota)


def _period_text(period_s: float) -> str:
    return {1.0: "second", 60.0: "minute", 3600.0: "hour"}.get(period_s, f"{period_s:g}s")


def _redis_client(url: str) -> Any:
    import redis.asyncio

    return redis.asyncio.Redis.from_url(
        url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S, health_check_interval=30
    )


def _limits_uri(url: str) -> str:
    if url.startswith("unix://"):
        return "async+redis+unix://" + url.removeprefix("unix://")
    return "async+" + url


class Quotas:
    """The rate and concurrency quotas of callers and the rate of client addresses.

    Use ``async with quotas.admit(caller):`` around an execution or a cell, and
    ``await quotas.check_client(address)`` before reading a request's body. Call
    :meth:`close` on shutdown."""

    def __init__(
        self,
        *,
        key_rate: tuple[int, float] | None = None,
        key_max_concurrent: int = 0,
        client_rate: tuple[int, float] | None = None,
        redis_url: str = "",
        lease_s: float = LEASE_S,
    ) -> None:
        self.redis_url = redis_url
        needs_store = bool(key_rate or key_max_concurrent or client_rate)
        self._client = _redis_client(redis_url) if redis_url and needs_store else None
        storage: Storage
        if self._client is not None:
            storage = RedisStorage(
                _limits_uri(redis_url), implementation="redispy", wrap_exceptions=True, key_prefix=KEY_PREFIX,
                connection_pool=self._client.connection_pool,
            )
        else:
            storage = MemoryStorage(wrap_exceptions=True)
        self._storage = storage
        limiter = MovingWindowRateLimiter(storage)
        self._key_rate = _Rate(*key_rate, limiter, "key", "SANDBOX_KEY_RATE") if key_rate else None
        self._client_rate = _Rate(*client_rate, limiter, "address", "SANDBOX_RATE_LIMIT") if client_rate else None
        self._slots: _Slots | None = None
        if key_max_concurrent:
            self._slots = (
                _RedisSlots(self._client, key_max_concurrent, lease_s) if self._client is not None
                else _LocalSlots(key_max_concurrent)
            )

    @classmethod
    def from_settings(cls, settings: Settings) -> Quotas:
        return cls(
            key_rate=settings.key_rate_limit,
            key_max_concurrent=settings.key_max_concurrent,
            client_rate=settings.rate,
            redis_url=settings.redis_url.get_secret_value(),
        )

    @property
    def store(self) -> str:
        """Where the quotas are counted: ``redis``, ``memory``, or ``none`` when no quota is set."""
        if self._key_rate is None and self._client_rate is None and self._slots is None:
            return "none"
        return "redis" if self._client is not None else "memory"

    async def start(self) -> None:
        """Say at start-up whether Redis answers (requests get 503 for as long as it does not)."""
        if self._client is None:
            return
        try:
            await self._client.ping()
        except (RedisError, OSError) as exc:
            log.error("%s; requests with a quota are refused (503) until it answers", _unavailable(exc))
        else:
            log.info("quotas are shared through Redis")

    async def close(self) -> None:
        if self._slots is not None:
            await self._slots.close()
        timer = getattr(self._storage, "timer", None)  # MemoryStorage's expiry task
        if isinstance(timer, asyncio.Task):
            timer.cancel()
        if self._client is not None:
            await self._client.aclose()

    async def check_client(self, address: str) -> None:
        """LimitExceededError when ``address`` is over ``SANDBOX_RATE_LIMIT``."""
        if self._client_rate is not None:
            await self._client_rate.hit(address, "this client address", "address_rate")

    @contextlib.asynccontextmanager
    async def admit(self, caller: str | None) -> AsyncIterator[None]:
        """Hold one of ``caller``'s concurrency slots, after one unit of its rate, for the
        body of the ``async with``; LimitExceededError above either, UnavailableError when
        Redis does not answer. A request refused spends neither."""
        bucket = caller or ANONYMOUS
        who = f"the API key {caller!r}" if caller else "a caller without a key"
        slot = None
        if self._slots is not None:
            slot = await self._slots.acquire(bucket)
            if slot is None:
                raise LimitExceededError(
                    f"{who} already runs {self._slots.limit} execution(s), its limit (SANDBOX_KEY_MAX_CONCURRENT)",
                    CONCURRENCY_RETRY_S, "concurrency",
                )
        try:
            if self._key_rate is not None:
                await self._key_rate.hit(bucket, who, "rate")
            yield
        finally:
            if slot is not None and self._slots is not None:
                # shielded: a cancelled request still gives its slot back
                await asyncio.shield(self._slots.release(bucket, slot))
