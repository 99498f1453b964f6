"""Escape: a program holds no capability, not even in its bounding set, on every backend.

The inner wall drops every capability (the sandbox's uid is not root) and empties the
bounding set, so that nothing the program starts can ever regain one (a set-uid binary,
a file capability). Read from the kernel's (or the sentry's) own view, ``/proc/self/status``,
for the program and for a process it starts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from execbox.models import Status

if TYPE_CHECKING:
    from tests.conftest import SandboxRunner

CAPABILITIES = {
    "python": """
import subprocess

def caps(text):
    return {k: int(v.strip(), 16) for k, _, v in (line.partition(":") for line in text.splitlines()) if k.startswith("Cap")}

def main():
    with open("/proc/self/status") as fh:
        own = caps(fh.read())
    child = caps(subprocess.run(["/bin/cat", "/proc/self/status"], capture_output=True, text=True, check=True).stdout)
    return {"own": own, "child": child}
""",
    "nodejs": """
const fs = require('fs');
const { execFileSync } = require('child_process');
const caps = (text) => Object.fromEntries(text.split('\\n').filter((l) => l.startsWith('Cap'))
  .map((l) => [l.split(':')[0], parseInt(l.split(':')[1].trim(), 16)]));
function main() {
  return { own: caps(fs.readFileSync('/proc/self/status', 'utf8')),
           child: caps(execFileSync('/bin/cat', ['/proc/self/status'], { encoding: 'utf8' })) };
}
""",
}


@pytest.mark.parametrize("language", ["python", "nodejs"])
def test_a_program_and_its_children_hold_no_capability(executor: SandboxRunner, language: str) -> None:
    result = executor.run(CAPABILITIES[language], language)
    assert result.status is Status.SUCCESS, executor.describe(result)
    value = result.result.value  # type: ignore[union-attr]
    for who in ("own", "child"):
        sets = value[who]
        assert {"CapEff", "CapPrm", "CapBnd"} <= set(sets), f"{who}: no capability sets in /proc/self/status: {sets}"
        held = {name: hex(mask) for name, mask in sets.items() if mask}
        assert not held, f"{who} holds capabilities: {held}"
