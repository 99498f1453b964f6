"""Escape: the host's file system stays out of reach (read, write, devices, leftovers).

Every program here is hostile, the code check is off (the sandbox itself is tested), and
after each one the next execution must still work.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from execbox.models import Status
from execbox.runtimes import RUNTIMES

if TYPE_CHECKING:
    from tests.conftest import SandboxRunner

#: a Python helper the programs below share: try an action, report ok/error per path
TRY = """
import json, os

def attempt(action, *args):
    try:
        value = action(*args)
    except OSError as exc:  # a refusal; any other exception is a bug of the probe and fails the run
        return {"error": f"{type(exc).__name__}: {exc}"}
    return {"ok": value}

def read_text(path):
    with open(path, "rb") as fh:
        return fh.read(1 << 16).decode("latin-1")

def write_file(path):
    with open(path, "w") as fh:
        fh.write("escaped")
    return "written"

def append_file(path):
    with open(path, "a") as fh:
        fh.write("# escaped")
    return "appended"

def open_for_write(path):
    fd = os.open(path, os.O_WRONLY)
    os.close(fd)
    return "opened"
"""


@pytest.fixture
def host_markers() -> Iterator[dict[str, Path]]:
    """Files planted on the host where a program could find them if the sandbox leaked."""
    token = uuid.uuid4().hex
    markers = {
        "root": Path("/root") / f".execbox-escape-{token}",
        "tmp": Path("/tmp") / f"execbox-escape-{token}",
        "shm": Path("/dev/shm") / f"execbox-escape-{token}",
    }
    for path in markers.values():
        path.write_text(f"host secret {token}\n")
    try:
        yield markers
    finally:
        for path in markers.values():
            path.unlink(missing_ok=True)


def _host_secrets(markers: dict[str, Path]) -> list[str]:
    secrets = [path.read_text().strip() for path in markers.values()]
    shadow = Path("/etc/shadow")
    if shadow.exists():
        secrets += [line for line in shadow.read_text().splitlines() if line.strip()]
    return secrets


def test_host_secrets_are_unreadable(executor: SandboxRunner, host_markers: dict[str, Path]) -> None:
    paths = ["/etc/shadow", "/etc/gshadow", "/proc/1/root/etc/shadow", *map(str, host_markers.values())]
    result = executor.run(
        TRY
        + f"""
def main():
    out = {{path: attempt(read_text, path) for path in {paths!r}}}
    out["/root"] = attempt(os.listdir, "/root")
    out["ls /tmp"] = attempt(os.listdir, "/tmp")
    return out
"""
    )
    assert result.status is Status.SUCCESS, executor.describe(result)
    out = result.result.value  # type: ignore[union-attr]
    for path in paths:
        assert "error" in out[path] or out[path]["ok"] == "", f"{path} was readable: {out[path]}"
    root_listing = out["/root"].get("ok") or []
    assert host_markers["root"].name not in root_listing
    assert not set(os.listdir("/root")) & set(root_listing), f"host /root is visible: {root_listing}"
    assert host_markers["tmp"].name not in (out["ls /tmp"].get("ok") or [])
    blob = result.stdout + result.stderr + repr(out)
    for secret in _host_secrets(host_markers):
        assert secret not in blob
    executor.assert_still_works()


def test_host_secrets_are_unreadable_from_nodejs(executor: SandboxRunner, host_markers: dict[str, Path]) -> None:
    paths = ["/etc/shadow", str(host_markers["root"]), str(host_markers["tmp"])]
    result = executor.run(
        f"""
        const fs = require('fs');
        const cp = require('child_process');
        function tryIt(fn) {{
          try {{ return {{ ok: String(fn()) }}; }} catch (e) {{
            if (!e.code && !e.status) throw e;  // not a refusal: a bug of the probe
            return {{ error: String(e.code || e.status) + ': ' + String(e.message) }};
          }}
        }}
        function main() {{
          const out = {{}};
          for (const p of {paths!r}) out[p] = tryIt(() => fs.readFileSync(p, 'latin1'));
          out['/root'] = tryIt(() => fs.readdirSync('/root').join(','));
          out['sh'] = tryIt(() => cp.execFileSync('/bin/cat', ['/etc/shadow'], {{ stdio: 'pipe' }}));
          return out;
        }}
        """,
        "nodejs",
    )
    assert result.status is Status.SUCCESS, executor.describe(result)
    out = result.result.value  # type: ignore[union-attr]
    for key in [*paths, "sh"]:
        assert "error" in out[key] or out[key]["ok"] == "", f"{key} was readable: {out[key]}"
    blob = result.stdout + result.stderr + repr(out)
    for secret in _host_secrets(host_markers):
        assert secret not in blob
    executor.assert_still_works(("python", "nodejs"))


def test_writes_outside_the_workspace_fail(executor: SandboxRunner) -> None:
    token = uuid.uuid4().hex
    targets = [
        f"/usr/execbox-escape-{token}",
        f"/usr/bin/execbox-escape-{token}",
        f"/etc/execbox-escape-{token}",
        f"/execbox-escape-{token}",
        f"/opt/execbox-escape-{token}",
    ]
    runtime_env = RUNTIMES[next(iter(RUNTIMES))].env_dir(executor.settings.runtime_dir)
    driver = RUNTIMES[next(iter(RUNTIMES))].driver_path
    driver_digest = hashlib.sha256(driver.read_bytes()).hexdigest()
    result = executor.run(
        TRY
        + f"""
import sys

def main():
    targets = {targets!r} + [os.path.join(sys.prefix, "execbox-escape-{token}"),
                              os.path.join(os.path.dirname(os.__file__), "execbox-escape-{token}.py")]
    out = {{path: attempt(write_file, path) for path in targets}}
    drivers = set(["/opt/driver/driver.py", "/opt/driver/driver.js", sys.argv[0] or "/opt/driver/driver.py"])
    for module in ("driver", "__main__", "zygote"):
        drivers.add(getattr(sys.modules.get(module), "__file__", None) or "/opt/driver/driver.py")
    out["driver"] = [attempt(append_file, path) for path in sorted(drivers)]
    out["os.py"] = attempt(append_file, os.__file__)
    out["mkdir /usr"] = attempt(os.mkdir, "/usr/execbox-escape-dir-{token}")
    out["chmod /usr/bin"] = attempt(os.chmod, "/usr/bin", 0o777)
    out["sysrq"] = attempt(open_for_write, "/proc/sysrq-trigger")
    out["hostname"] = attempt(open_for_write, "/proc/sys/kernel/hostname")
    out["core_pattern"] = attempt(open_for_write, "/proc/sys/kernel/core_pattern")
    return out
"""
    )
    assert result.status is Status.SUCCESS, executor.describe(result)
    out = result.result.value  # type: ignore[union-attr]
    assert len(out) == len(targets) + 9
    for key, outcome in out.items():
        for attempt in outcome if isinstance(outcome, list) else [outcome]:
            assert "error" in attempt, f"{key}: the sandbox could write: {attempt}"
    for target in targets:
        assert not os.path.lexists(target)
    assert not os.path.lexists(f"/usr/execbox-escape-dir-{token}")
    assert not any(token in name for name in os.listdir(runtime_env))
    assert hashlib.sha256(driver.read_bytes()).hexdigest() == driver_digest
    executor.assert_still_works()


def test_host_block_and_memory_devices_are_unreachable(executor: SandboxRunner) -> None:
    devices = ["/dev/vda", "/dev/sda", "/dev/nvme0n1", "/dev/mem", "/dev/kmem", "/dev/port", "/dev/kmsg", "/dev/loop0"]
    result = executor.run(
        TRY
        + f"""
def main():
    return {{dev: attempt(read_text, dev) for dev in {devices!r}}}
"""
    )
    assert result.status is Status.SUCCESS, executor.describe(result)
    for dev, outcome in result.result.value.items():  # type: ignore[union-attr]
        assert "error" in outcome, f"{dev} was readable inside the sandbox"
    executor.assert_still_works()


@pytest.mark.parametrize("language", ["python", "nodejs"])
def test_files_left_behind_are_gone_in_the_next_execution(executor: SandboxRunner, language: str) -> None:
    token = uuid.uuid4().hex
    places = [f"/tmp/left-{token}", f"left-{token}", f"artifacts/left-{token}.csv", f"/dev/shm/left-{token}"]
    if language == "python":
        write = f"def main():\n    for p in {places!r}:\n        open(p, 'w').write('x')\n    return 'done'\n"
        look = f"import os\ndef main():\n    return [os.path.exists(p) for p in {places!r}]\n"
    else:
        write = (
            "const fs = require('fs');\n"
            f"function main() {{ for (const p of {places!r}) fs.writeFileSync(p, 'x'); return 'done'; }}\n"
        )
        look = f"const fs = require('fs');\nfunction main() {{ return {places!r}.map((p) => fs.existsSync(p)); }}\n"
    first = executor.run(write, language)
    assert first.status is Status.SUCCESS, executor.describe(first)
    assert first.result is not None and first.result.value == "done"
    second = executor.run(look, language)
    assert second.status is Status.SUCCESS, executor.describe(second)
    assert second.result is not None and second.result.value == [False] * len(places)
    # and nothing of it reached the host's /tmp or /dev/shm
    assert not os.path.lexists(f"/tmp/left-{token}")
    assert not os.path.lexists(f"/dev/shm/left-{token}")


def test_shared_memory_and_ipc_are_private(executor: SandboxRunner) -> None:
    token = uuid.uuid4().hex
    first = executor.run(
        f"""
        from multiprocessing import shared_memory

        def main():
            shm = shared_memory.SharedMemory(name="execbox-{token}", create=True, size=4096)
            shm.buf[:6] = b"secret"
            shm.close()  # not unlinked: left for the next execution to find
            return "created"
        """
    )
    assert first.status is Status.SUCCESS, executor.describe(first)
    second = executor.run(
        f"""
        from multiprocessing import shared_memory

        def main():
            try:
                shm = shared_memory.SharedMemory(name="execbox-{token}")
            except FileNotFoundError:
                return "absent"
            return bytes(shm.buf[:6]).decode()
        """
    )
    assert second.status is Status.SUCCESS, executor.describe(second)
    assert second.result is not None and second.result.value == "absent"
    assert not os.path.lexists(f"/dev/shm/execbox-{token}")
