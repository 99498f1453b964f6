"""Language runtimes (data only): which interpreter, which driver, which packages."""

from __future__ import annotations

from execbox.errors import BadRequestError
from execbox.models import Language
from execbox.runtimes.base import (
    CONTROL_FD_ENV,
    DRIVER_MOUNT,
    EVENTS_FD_ENV,
    RUNTIME_MOUNT,
    SYSTEM_PYTHON,
    WORKSPACE,
    Runtime,
)
from execbox.runtimes.nodejs import NODEJS
from execbox.runtimes.python import PYTHON

__all__ = [
    "CONTROL_FD_ENV",
    "DRIVER_MOUNT",
    "EVENTS_FD_ENV",
    "RUNTIMES",
    "RUNTIME_MOUNT",
    "SYSTEM_PYTHON",
    "WORKSPACE",
    "Runtime",
    "get_runtime",
]

RUNTIMES: dict[Language, Runtime] = {PYTHON.language: PYTHON, NODEJS.language: NODEJS}


def get_runtime(language: Language | str) -> Runtime:
    try:
        return RUNTIMES[Language(language)]
    except ValueError as exc:
        raise BadRequestError(f"unknown language {language!r}; use python or nodejs") from exc
