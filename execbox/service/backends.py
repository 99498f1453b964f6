"""The isolation backends by name, and choosing the one ``SANDBOX_BACKEND`` names.

:data:`BACKENDS` is the one registry: for each backend its name, how it is built from the
settings, whether ``SANDBOX_BACKEND=auto`` may pick it (in the registry's order: the first
that works wins) and its modes (the settings that select each mode besides the default; the
contract and escape suites run every mode). :func:`build_backend`, :func:`select_backend`,
``execbox doctor`` and the test suites' parametrisation read it. ``SANDBOX_BACKEND``'s
choices (:class:`~execbox.settings.BackendChoice`, in the bottom layer, which cannot import
this one) are ``auto`` plus the backends that settings may name; a unit test keeps the two
in step. ``unisolated-test`` is registered so that its name is known, and refused here.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from execbox.errors import BackendUnavailableError, ConfigurationError
from execbox.isolation.base import IsolationBackend
from execbox.settings import BackendChoice, Settings

__all__ = ["AUTO_ORDER", "BACKENDS", "BACKEND_NAMES", "SECCOMP_PROFILE", "BackendEntry", "build_backend",
           "select_backend"]  # fmt: skip

log = logging.getLogger("execbox.backends")

SECCOMP_PROFILE = Path(__file__).resolve().parent.parent / "seccomp-profile-default.json"


@dataclass(frozen=True, kw_only=True)
class BackendEntry:
    """One isolation backend in the registry."""

    name: str
    #: constructs (does not check) the backend from the settings
    build: Callable[[Settings], IsolationBackend]
    #: whether SANDBOX_BACKEND may name it
    from_settings: bool = True
    #: whether SANDBOX_BACKEND=auto may pick it
    auto: bool = True
    #: its modes besides the default: (mode name, the settings that select it)
    modes: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()


def _namespaces(settings: Settings) -> IsolationBackend:
    from execbox.isolation.namespaces import NamespacesBackend

    return NamespacesBackend(settings.state_dir, settings.uid_base, settings.uid_count, forkserver=settings.forkserver)


def _gvisor(settings: Settings) -> IsolationBackend:
    try:
        module = importlib.import_module("execbox.isolation.gvisor")
    except ImportError as exc:
        raise BackendUnavailableError(f"the gvisor backend is not available in this build: {exc}") from exc
    profile = SECCOMP_PROFILE if settings.enable_seccomp else None
    return module.GVisorBackend(  # type: ignore[no-any-return]
        settings.state_dir,
        seccomp_profile=profile,
        platform=settings.gvisor_platform,
        executions_per_sandbox=settings.gvisor_executions_per_sandbox,
        sandbox_lifetime_s=settings.gvisor_sandbox_lifetime,
        uid_base=settings.uid_base,
        uid_count=settings.uid_count,
    )


def _unisolated_test(settings: Settings) -> IsolationBackend:
    # execbox.isolation.unisolated: never built from settings, never by auto
    raise ConfigurationError(
        "SANDBOX_BACKEND='unisolated-test': that backend isolates nothing; only a test may build it, in code"
    )


#: every backend, in auto's order of preference
BACKENDS: tuple[BackendEntry, ...] = (
    BackendEntry(name="gvisor", build=_gvisor, modes=(("single", (("gvisor_executions_per_sandbox", 1),)),)),
    BackendEntry(name="namespaces", build=_namespaces, modes=(("bwrap", (("forkserver", False),)),)),
    BackendEntry(name="unisolated-test", build=_unisolated_test, from_settings=False, auto=False),
)
_BY_NAME = {entry.name: entry for entry in BACKENDS}
#: the backends SANDBOX_BACKEND may name (and the doctor checks), in order
BACKEND_NAMES = tuple(entry.name for entry in BACKENDS if entry.from_settings)
#: the backends SANDBOX_BACKEND=auto tries, first to last
AUTO_ORDER = tuple(entry.name for entry in BACKENDS if entry.auto)


def build_backend(name: str, settings: Settings) -> IsolationBackend:
    """Construct (not check) the backend called ``name``."""
    if (entry := _BY_NAME.get(name)) is None:
        choices = ", ".join(("auto", *BACKEND_NAMES[:-1])) + f" or {BACKEND_NAMES[-1]}"
        raise ConfigurationError(f"SANDBOX_BACKEND={name!r}: unknown backend; use {choices}")
    return entry.build(settings)


def select_backend(settings: Settings) -> tuple[IsolationBackend, list[str]]:
    """The configured backend, checked; with ``auto``, the first of :data:`AUTO_ORDER` that
    works (gVisor when it works, else namespaces).

    Returns the backend and the warnings to show (at start-up and in /healthz).
    """
    if settings.backend is not BackendChoice.AUTO:
        backend = build_backend(settings.backend.value, settings)
        backend.check()
        return backend, []
    warnings: list[str] = []
    for name in AUTO_ORDER:
        try:
            backend = build_backend(name, settings)
            backend.check()
        except BackendUnavailableError as exc:
            warnings.append(f"{name} backend unavailable: {exc}")
            continue
        if warnings:
            for warning in warnings:
                log.warning("%s; using %s", warning, name)
        return backend, warnings
    raise BackendUnavailableError("no isolation backend works on this host: " + "; ".join(warnings))
