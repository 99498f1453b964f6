"""Node.js packages per request: npm names and versions, and the layer first on NODE_PATH.

Pure functions; the service layer validates with :data:`NPM`, installs with npm (the
``"npm"`` installer of :mod:`execbox.service.package_install`, which makes the layer's
``node_modules/``) and mounts the layer.
"""

from __future__ import annotations

import re

from execbox.runtimes.base import PackageGrammar

__all__ = ["NPM"]

_NAME = r"(?:@[A-Za-z0-9][A-Za-z0-9._~-]{0,100}/)?[A-Za-z0-9][A-Za-z0-9._~-]{0,100}"
#: a version, range or tag; never one npm reads as a path (".", "..", "./x" are directories to it)
_REQUIREMENT = re.compile(rf"({_NAME})(?:(?:@|==)([A-Za-z0-9^~<>=*][A-Za-z0-9.^~<>=*+_-]{{0,63}}))?")


def _canonical(match: re.Match[str]) -> tuple[str, str]:
    name = match.group(1)
    return name, f"{name}@{match.group(2)}" if match.group(2) else name


def _name_of(requirement: str) -> str:
    return (requirement.rsplit("@", 1)[0] if requirement.rfind("@") > 0 else requirement).lower()


def _as_listed(name: str) -> str:
    return name


def _layer_env(env: dict[str, str], mount: str) -> dict[str, str]:
    return {**env, "NODE_PATH": ":".join(filter(None, (f"{mount}/node_modules", env.get("NODE_PATH", ""))))}


NPM = PackageGrammar(
    form="an npm name with an optional version (is-number, is-number@7.0.0, is-number@^7, @scope/name@1.2.3)",
    pattern=_REQUIREMENT,
    canonical=_canonical,
    name_of=_name_of,
    normalise=_as_listed,
    installer="npm",
    layer_env=_layer_env,
)
