"""The Node.js runtime: the system's node with an npm package directory, and its driver."""

from __future__ import annotations

from pathlib import Path

from execbox.models import Language
from execbox.runtimes.base import RUNTIME_MOUNT, Runtime
from execbox.runtimes.nodejs.packages import NPM

__all__ = ["NODEJS"]

_HERE = Path(__file__).resolve().parent
_NODE = "/usr/bin/node"

NODEJS = Runtime(
    language=Language.NODEJS,
    display_name="Node.js",
    aliases=("javascript",),
    file_suffixes=(".js", ".mjs", ".cjs"),
    interpreter=Path(_NODE),
    builder="npm",
    inspector="javascript",
    packages=NPM,
    driver_path=_HERE / "driver.js",
    packages_file=_HERE / "package.json",
    argv_template=(_NODE, "--disallow-code-generation-from-strings", "{driver}"),
    env=(("NODE_PATH", f"{RUNTIME_MOUNT}/node_modules"),),
)
