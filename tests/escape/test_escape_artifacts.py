"""Escape: artifacts are read from the host side, so symlinks must never be followed.

The host collects ``artifacts/`` of the live sandbox. A symlink whose target is an
absolute host path (/etc/passwd, or a host directory planted by the test with files of
allowed types) would hand the host's files to the program's caller if followed there.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from execbox.models import ExecutionResult, Status

if TYPE_CHECKING:
    from tests.conftest import SandboxRunner


@pytest.fixture
def host_bait() -> Iterator[Path]:
    """A host directory of allowed-type files that the sandbox cannot see but might link to."""
    token = uuid.uuid4().hex
    bait = Path("/tmp") / f"execbox-bait-{token}"
    bait.mkdir(mode=0o755)
    for name in ("secret.png", "secret.csv", "secret.json"):
        (bait / name).write_text(f"host secret {token}\n")
    (bait / "secret.png").chmod(0o644)
    try:
        yield bait
    finally:
        for child in bait.iterdir():
            child.unlink()
        bait.rmdir()


def _host_contents(bait: Path) -> set[bytes]:
    contents = {p.read_bytes() for p in bait.iterdir()}
    contents |= {Path(p).read_bytes() for p in ("/etc/passwd", "/etc/shadow", "/etc/hostname") if Path(p).exists()}
    return contents


def _assert_no_host_content(result: ExecutionResult, bait: Path) -> None:
    host = _host_contents(bait)
    for artifact in result.artifacts:
        assert artifact.content not in host, f"artifact {artifact.name} carries a host file"
        assert bait.name.encode() not in artifact.content


def test_symlinked_artifacts_yield_nothing(executor: SandboxRunner, host_bait: Path) -> None:
    result = executor.run(
        f"""
        import os

        def main():
            links = {{
                "passwd.png": "/etc/passwd",
                "shadow.csv": "/etc/shadow",
                "bait.png": "{host_bait}/secret.png",
                "bait.csv": "{host_bait}/secret.csv",
                "relative.json": "../../../../../../..{host_bait}/secret.json",
                "proc-root.csv": "/proc/1/root/etc/passwd",
                "dangling.json": "/nonexistent/x.json",
            }}
            for name, target in links.items():
                os.symlink(target, os.path.join("artifacts", name))
            with open("artifacts/legit.csv", "w") as fh:
                fh.write("a,b\\n1,2\\n")
            return sorted(os.listdir("artifacts"))
        """
    )
    assert result.status is Status.SUCCESS, executor.describe(result)
    assert result.result is not None and len(result.result.value) == 8  # the links were made
    assert [(a.name, a.content) for a in result.artifacts] == [("legit.csv", b"a,b\n1,2\n")]
    _assert_no_host_content(result, host_bait)
    executor.assert_still_works()


@pytest.mark.parametrize("target", ["/etc", "bait"])
def test_artifacts_dir_replaced_by_a_symlink_yields_nothing(
    executor: SandboxRunner, host_bait: Path, target: str
) -> None:
    link_target = str(host_bait) if target == "bait" else target
    result = executor.run(
        f"""
        import os, shutil

        def main():
            shutil.rmtree("artifacts")
            os.symlink({link_target!r}, "artifacts")
            return os.readlink("artifacts")
        """
    )
    assert result.status is Status.SUCCESS, executor.describe(result)
    assert result.result is not None and result.result.value == link_target
    assert result.artifacts == ()
    _assert_no_host_content(result, host_bait)
    executor.assert_still_works()


def test_special_files_in_artifacts_are_ignored_without_hanging(executor: SandboxRunner) -> None:
    result = executor.run(
        """
        import os, socket

        def main():
            os.mkfifo("artifacts/fifo.csv")
            os.mkdir("artifacts/dir.png")
            with open("artifacts/dir.png/inner.png", "wb") as fh:
                fh.write(b"nested")
            sock = socket.socket(socket.AF_UNIX)
            sock.bind("artifacts/sock.json")
            with open("artifacts/real.json", "w") as fh:
                fh.write("{}")
            return sorted(os.listdir("artifacts"))
        """,
        limits=executor.limits(wall_time_s=5.0),
    )
    assert result.status is Status.SUCCESS, executor.describe(result)
    assert result.result is not None and result.result.value == ["dir.png", "fifo.csv", "real.json", "sock.json"]
    assert [(a.name, a.content) for a in result.artifacts] == [("real.json", b"{}")]
    executor.assert_still_works()


def test_hard_link_to_a_system_file_is_refused_or_harmless(executor: SandboxRunner, host_bait: Path) -> None:
    result = executor.run(
        """
        import os, sys

        def main():
            out = {}
            for name, source in (("passwd.csv", "/etc/passwd"), ("python.png", sys.executable), ("os.csv", os.__file__)):
                try:
                    os.link(source, os.path.join("artifacts", name))
                    out[name] = "linked"
                except OSError as exc:
                    out[name] = type(exc).__name__
            return out
        """
    )
    assert result.status is Status.SUCCESS, executor.describe(result)
    # hard links cannot cross into the sandbox's own tmpfs from read-only binds
    assert all(v != "linked" for v in result.result.value.values()), result.result  # type: ignore[union-attr]
    _assert_no_host_content(result, host_bait)
    executor.assert_still_works()
