"""Escape (information): nothing of the host's layout is visible inside a sandbox.

A program reads ``/proc/self/mountinfo``, the command lines and environments of every
process it can see and its interpreter's own paths, in Python and in Node.js. None of it may
name the service's state directory, the runtime environments' host directory, the checkout
execbox runs from, or the host's root disk; ``/proc/1/cmdline`` must not carry the
launcher's options.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import execbox
from execbox.models import Status

if TYPE_CHECKING:
    from tests.conftest import SandboxRunner

_PYTHON_PROBE = """
import os, sys

def main():
    seen = {"mountinfo": open("/proc/self/mountinfo").read(), "paths": [sys.executable, sys.prefix, *sys.path]}
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            for name in ("cmdline", "environ"):
                try:
                    with open(f"/proc/{pid}/{name}", "rb") as fh:
                        seen[f"{pid}/{name}"] = fh.read().replace(b"\\0", b" ").decode("latin-1")
                except OSError:
                    pass
    return seen
"""

_NODE_PROBE = """
const fs = require('fs');
function main() {
  const seen = { mountinfo: fs.readFileSync('/proc/self/mountinfo', 'utf8'), paths: [process.execPath, ...module.paths] };
  for (const pid of fs.readdirSync('/proc').filter((n) => /^[0-9]+$/.test(n))) {
    for (const name of ['cmdline', 'environ']) {
      try { seen[`${pid}/${name}`] = fs.readFileSync(`/proc/${pid}/${name}`, 'latin1').split('\\0').join(' '); } catch (e) {}
    }
  }
  return seen;
}
"""


def _host_root_source() -> str:
    """The device (or overlay) the host's ``/`` is mounted from, as mountinfo names it."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == "/":
            return fields[fields.index("-") + 2]
    return ""


def _forbidden(executor: SandboxRunner) -> dict[str, str]:
    names = {
        "the state directory": str(executor.settings.state_dir),
        "the runtimes' host directory": str(executor.settings.runtime_dir.resolve()),
        "the checkout": str(Path(execbox.__file__).resolve().parent.parent),
    }
    source = _host_root_source()
    if source.startswith("/dev/"):
        names["the host's root disk"] = source
    return names


def test_no_host_paths_inside(executor: SandboxRunner) -> None:
    forbidden = _forbidden(executor)
    assert all(len(value) > 4 for value in forbidden.values()), forbidden  # the probe is not vacuous
    for language, code in (("python", _PYTHON_PROBE), ("nodejs", _NODE_PROBE)):
        result = executor.run(code, language)
        assert result.status is Status.SUCCESS, executor.describe(result)
        seen = result.result.value  # type: ignore[union-attr]
        assert "/opt/runtime" in seen["mountinfo"] or "/opt/runtime" in " ".join(seen["paths"]), seen["mountinfo"]
        commands = {key: value for key, value in seen.items() if key.endswith("/cmdline")}
        assert commands, f"{language}: no process visible at all: the probe is broken"
        for key, value in commands.items():
            assert "--ro-bind" not in value and "--setenv" not in value, f"{language}: {key} shows {value!r}"
        checked = {key: value for key, value in seen.items() if key != "paths"}
        checked["paths"] = " ".join(seen["paths"])
        for what, path in forbidden.items():
            for key, value in checked.items():
                assert path not in value, f"{language}: {key} names {what} ({path}):\n{value}"
    executor.assert_still_works(("python", "nodejs"))

