"""Language runtimes (data only), and the one registry of them: :data:`RUNTIMES`.

Each language is one folder here (``python/``, ``nodejs/``) whose :class:`Runtime` declares
everything language-specific; callers find it by name (:func:`get_runtime`,
:func:`find_runtime`, :func:`runtime_for_file`) and call what it declares. The wire enum
:class:`~execbox.models.Language` has one member per registered runtime (a unit test keeps
the two in step); every other list of languages is read from here.
"""

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
    PackageGrammar,
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
    "PackageGrammar",
    "Runtime",
    "find_runtime",
    "get_runtime",
    "language_names",
    "runtime_for_file",
]

#: every runtime, in the order the service lists them (the first is the default language)
RUNTIMES: dict[Language, Runtime] = {runtime.language: runtime for runtime in (PYTHON, NODEJS)}
_BY_NAME: dict[str, Runtime] = {
    name.casefold(): runtime for runtime in RUNTIMES.values() for name in (runtime.name, *runtime.aliases)
}


def language_names() -> tuple[str, ...]:
    """The names of the registered languages, in order (``("python", "nodejs")``)."""
    return tuple(runtime.name for runtime in RUNTIMES.values())


def get_runtime(language: Language | str) -> Runtime:
    """The runtime of ``language`` (a member, its value or a wire alias); BadRequestError if none."""
    try:
        return RUNTIMES[Language(language)]
    except (ValueError, KeyError) as exc:
        raise BadRequestError(f"unknown language {language!r}; use {' or '.join(language_names())}") from exc


def find_runtime(name: str) -> Runtime | None:
    """The runtime called ``name`` or one of its aliases (case-insensitive), else None."""
    return _BY_NAME.get(name.strip().casefold())


def runtime_for_file(file_name: str) -> Runtime:
    """The runtime whose file suffixes end ``file_name``; the default (first) runtime if none does."""
    for runtime in RUNTIMES.values():
        if file_name.endswith(runtime.file_suffixes):
            return runtime
    return next(iter(RUNTIMES.values()))
