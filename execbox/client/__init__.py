"""The Python client of an execbox service: ``Client`` (sync) and ``AsyncClient`` (asyncio).

Both speak the same HTTP API (docs/api.md; usage in docs/client.md) and give typed
answers: an :class:`~execbox.models.ExecutionResult` for every run, a
:class:`~execbox.models.SessionInfo` for sessions, and :class:`OutputEvent` /
:class:`ResultEvent` while a run streams. The service's refusals are raised as execbox
exceptions carrying the service's own message (400/413/422 BadRequestError, 401
AuthenticationError, 404 NotFoundError, 429/503 LimitExceededError with
``retry_after_s``, any other status ServiceError); a connection that cannot be made, breaks
or times out is ServiceUnreachableError. Never an httpx exception.

What the program did is never an exception: a failed program is a result whose
``status`` says why.

This package imports only httpx, pydantic and execbox's models, errors and wire (not the
service stack). ``calls`` builds every request and reads every answer; ``sync`` and ``aio``
only send them.
"""

from __future__ import annotations

from execbox.client.aio import AsyncClient, AsyncSession
from execbox.client.calls import DEFAULT_URL, OutputEvent, ResultEvent, StreamEvent
from execbox.client.sync import Client, Session

__all__ = [
    "DEFAULT_URL", "AsyncClient", "AsyncSession", "Client", "OutputEvent", "ResultEvent", "Session", "StreamEvent",
]
