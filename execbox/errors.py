"""The one exception tree of execbox.

Exceptions are for execbox's own faults. What happens to the user's program (an
exception, a timeout, an OOM kill, a disallowed syscall) is data in
``ExecutionResult.status``, never an exception.

::

    ExecboxError
    ├── ConfigurationError          a setting is malformed or inconsistent (stops start-up)
    ├── BackendUnavailableError     an isolation backend cannot work on this host (says why / how to fix)
    ├── RuntimeEnvironmentError     a runtime environment is missing or broken (run `execbox build`)
    ├── SandboxError                a sandbox could not be built, driven or torn down
    │   ├── SandboxStartError       the sandbox or its driver did not come up
    │   └── SandboxProtocolError    the driver broke the host <-> driver protocol
    ├── PoolError
    │   ├── PoolBusyError           no sandbox became free within the wait time
    │   │   └── QueueFullError      SANDBOX_QUEUE_MAX requests already wait: refused at once
    │   └── PoolClosedError         the pool is shutting down
    ├── PackageInstallError         a request's packages could not be installed (index unreachable, timeout...)
    ├── BadRequestError             a request is invalid (unknown language, limits above maxima...)
    ├── NotFoundError               no such session or file (or not the caller's)
    ├── LimitExceededError          a quota or a service-wide cap is reached (says when to retry)
    ├── AuthenticationError         the service refused the API key (missing or wrong)
    ├── ServiceError                the service answered an error with no other name here (a 5xx...)
    ├── ServiceUnreachableError     the service could not be reached, or the connection broke
    └── UnavailableError            a store the service relies on (Redis) does not answer (says when to retry)

The client (``execbox.client``) raises BadRequestError to ServiceUnreachableError for the
service's answers: 400/413/422 -> BadRequestError, 404 -> NotFoundError, 429/503 ->
LimitExceededError, 401 -> AuthenticationError, each with the service's own message.
"""

from __future__ import annotations

__all__ = [
    "AuthenticationError",
    "BackendUnavailableError",
    "BadRequestError",
    "ConfigurationError",
    "ExecboxError",
    "LimitExceededError",
    "NotFoundError",
    "PackageInstallError",
    "PoolBusyError",
    "PoolClosedError",
    "PoolError",
    "QueueFullError",
    "RuntimeEnvironmentError",
    "SandboxError",
    "SandboxProtocolError",
    "SandboxStartError",
    "ServiceError",
    "ServiceUnreachableError",
    "UnavailableError",
]


class ExecboxError(Exception):
    """Root of every exception raised by execbox itself."""


class ConfigurationError(ExecboxError):
    """A setting is malformed; the message names the variable, the value and the accepted form."""


class BackendUnavailableError(ExecboxError):
    """An isolation backend cannot run on this host; the message says why and how to fix it."""


class RuntimeEnvironmentError(ExecboxError):
    """A language runtime environment is missing or broken."""


class SandboxError(ExecboxError):
    """A sandbox could not be built, driven or torn down."""


class SandboxStartError(SandboxError):
    """The sandbox or the driver inside it did not come up."""


class SandboxProtocolError(SandboxError):
    """The driver inside a sandbox broke the host <-> driver protocol."""


class PoolError(ExecboxError):
    """A sandbox pool could not serve a lease."""


class PoolBusyError(PoolError):
    """No sandbox became free within the wait time."""


class QueueFullError(PoolBusyError):
    """As many requests as the queue holds already wait for a sandbox: refused without waiting
    (-10 on ``/run``, 503 with ``Retry-After`` on ``/v1``)."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class PoolClosedError(PoolError):
    """The pool is shutting down and takes no more leases."""


class PackageInstallError(ExecboxError):
    """A request's packages could not be installed for a reason that is not the request's:
    the index is unreachable, the installer failed or ran out of time (a package that does not
    exist or is refused is a BadRequestError)."""


class BadRequestError(ExecboxError):
    """A request is invalid (unknown language, limits above the server's maxima...)."""


class NotFoundError(ExecboxError):
    """No such session or file: unknown, closed, expired, or another caller's."""


class LimitExceededError(ExecboxError):
    """A quota or a service-wide cap is reached; ``retry_after_s`` says when to try again,
    ``quota`` which one (``rate``, ``concurrency``, ``address_rate``; empty for the others)."""

    def __init__(self, message: str, retry_after_s: float = 1.0, quota: str = "") -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.quota = quota


class AuthenticationError(ExecboxError):
    """The service refused the request's API key: missing or wrong (HTTP 401)."""


class ServiceError(ExecboxError):
    """The service answered with an error the client has no other exception for (a 5xx, an
    answer that is not what the endpoint sends); ``status_code`` is the HTTP status."""

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class ServiceUnreachableError(ExecboxError):
    """The client could not reach the service, or the connection broke or timed out."""


class UnavailableError(ExecboxError):
    """A store the service relies on (the quotas' Redis) does not answer: the request is refused
    (fail closed, 503 with ``Retry-After``) rather than served without its limits."""

    def __init__(self, message: str, retry_after_s: float = 5.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
