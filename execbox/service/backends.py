"""Choose and build the isolation backend named by ``SANDBOX_BACKEND``."""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

from execbox.errors import BackendUnavailableError, ConfigurationError
from execbox.isolation.base import IsolationBackend
from execbox.settings import BackendChoice, Settings

__all__ = ["BACKEND_NAMES", "SECCOMP_PROFILE", "build_backend", "select_backend"]

log = logging.getLogger("execbox.backends")

BACKEND_NAMES = ("gvisor", "namespaces")
SECCOMP_PROFILE = Path(__file__).resolve().parent.parent / "seccomp-profile-default.json"


def build_backend(name: str, settings: Settings) -> IsolationBackend:
    """Construct (not check) the backend called ``name``."""
    if name == "namespaces":
        from execbox.isolation.namespaces import NamespacesBackend

        return NamespacesBackend(
            settings.state_dir, settings.uid_base, settings.uid_count, forkserver=settings.forkserver
        )
    if name == "gvisor":
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
    if name == "unisolated-test":  # execbox.isolation.unisolated: never built from settings, never by auto
        raise ConfigurationError(
            "SANDBOX_BACKEND='unisolated-test': that backend isolates nothing; only a test may build it, in code"
        )
    raise ConfigurationError(f"SANDBOX_BACKEND={name!r}: unknown backend; use auto, gvisor or namespaces")


def select_backend(settings: Settings) -> tuple[IsolationBackend, list[str]]:
    """The configured backend, checked; with ``auto``, gVisor when it works, else namespaces.

    Returns the backend and the warnings to show (at start-up and in /healthz).
    """
    if settings.backend is not BackendChoice.AUTO:
        backend = build_backend(settings.backend.value, settings)
        backend.check()
        return backend, []
    warnings: list[str] = []
    for name in BACKEND_NAMES:
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
