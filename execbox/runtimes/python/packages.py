"""Python packages per request: PyPI names and version specifiers, and the layer on PYTHONPATH.

Pure functions; the service layer validates with :data:`PYPI`, installs with pip (the
``"pip"`` installer of :mod:`execbox.service.package_install`, which puts the packages in
the layer's ``python/`` directory) and mounts the layer.
"""

from __future__ import annotations

import re

from execbox.runtimes.base import PackageGrammar

__all__ = ["PYPI", "normalise_python_name"]

_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,98}[A-Za-z0-9])?"
_CLAUSE = r"(?:==|!=|<=|>=|~=|<|>)\s*[A-Za-z0-9][A-Za-z0-9.+!*_-]{0,63}"
_REQUIREMENT = re.compile(rf"({_NAME})\s*((?:{_CLAUSE})(?:\s*,\s*{_CLAUSE})*)?")


def normalise_python_name(name: str) -> str:
    """PEP 503: ``Foo_Bar.baz`` -> ``foo-bar-baz``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _canonical(match: re.Match[str]) -> tuple[str, str]:
    name = normalise_python_name(match.group(1))
    clauses = sorted(re.sub(r"\s+", "", c) for c in (match.group(2) or "").split(",") if c.strip())
    return name, name + ",".join(clauses)


def _name_of(requirement: str) -> str:
    return re.split(r"[=<>!~]", requirement, maxsplit=1)[0]


def _layer_env(env: dict[str, str], mount: str) -> dict[str, str]:
    return {**env, "PYTHONPATH": f"{mount}/python"}


def _layer_argv(argv_template: tuple[str, ...]) -> tuple[str, ...]:
    # -I would ignore PYTHONPATH; -s -P keep the rest of what it does (no user site, no
    # script directory), and the environment is the spec's own, so nothing else changes
    return tuple(a for arg in argv_template for a in (("-s", "-P") if arg == "-I" else (arg,)))


PYPI = PackageGrammar(
    form="a PyPI name with an optional version specifier (tabulate, tabulate==0.9.0, tabulate>=0.8,<1)",
    pattern=_REQUIREMENT,
    canonical=_canonical,
    name_of=_name_of,
    normalise=normalise_python_name,
    installer="pip",
    layer_env=_layer_env,
    layer_argv=_layer_argv,
)
