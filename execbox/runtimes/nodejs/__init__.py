"""The Node.js runtime: the system's node with an npm package directory, and its driver."""

from __future__ import annotations

from pathlib import Path

from execbox.models import Language
from execbox.runtimes.base import Runtime

__all__ = ["NODEJS"]

_HERE = Path(__file__).resolve().parent

NODEJS = Runtime(
    language=Language.NODEJS,
    driver_path=_HERE / "driver.js",
    packages_file=_HERE / "package.json",
    argv_template=("/usr/bin/node", "--disallow-code-generation-from-strings", "{driver}"),
    env=(("NODE_PATH", "/opt/runtime/node_modules"),),
)
