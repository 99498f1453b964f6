"""Artifact collection from a workspace directory fd: types, caps, and no symlink followed."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from execbox.artifacts import MAX_ARTIFACT_BYTES, MAX_ARTIFACTS, MIME_TYPES, collect_artifacts
from execbox.models import Artifact


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    ws = tmp_path / "workspace"
    (ws / "artifacts").mkdir(parents=True)
    return ws


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory outside the workspace holding files a symlink could point at."""
    out = tmp_path / "outside"
    out.mkdir()
    (out / "secret.png").write_bytes(b"host secret png")
    (out / "secret.csv").write_bytes(b"host,secret\n")
    return out


def collect(ws: Path) -> tuple[Artifact, ...]:
    fd = os.open(ws, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return collect_artifacts(fd)
    finally:
        os.close(fd)


@pytest.fixture
def no_fd_leak() -> Iterator[None]:
    """Every fd the collector opened was closed again."""
    before = len(os.listdir("/proc/self/fd"))
    yield
    assert len(os.listdir("/proc/self/fd")) <= before


def test_regular_files_of_allowed_types(workspace: Path, no_fd_leak: None) -> None:
    files = {
        "a.png": b"\x89PNG\r\n\x1a\nxx", "b.jpg": b"jpg", "c.jpeg": b"jpeg", "d.svg": b"<svg/>",
        "e.pdf": b"%PDF", "f.csv": b"a,b\n", "g.json": b"{}", "h.html": b"<p>",
    }
    for name, content in files.items():
        (workspace / "artifacts" / name).write_bytes(content)
    found = collect(workspace)
    assert [a.name for a in found] == sorted(files)
    for artifact in found:
        assert artifact.content == files[artifact.name]
        assert artifact.size == len(files[artifact.name])
        assert artifact.mime_type == MIME_TYPES[os.path.splitext(artifact.name)[1]]
    assert {a.name: a.mime_type for a in found}["a.png"] == "image/png"
    assert {a.name: a.mime_type for a in found}["c.jpeg"] == "image/jpeg"


def test_extension_case_is_ignored(workspace: Path) -> None:
    (workspace / "artifacts" / "CHART.PNG").write_bytes(b"png")
    assert [(a.name, a.mime_type) for a in collect(workspace)] == [("CHART.PNG", "image/png")]


def test_disallowed_extensions_are_ignored(workspace: Path) -> None:
    for name in ("x.txt", "x.exe", "x.sh", "x.py", "noext", ".png", "x.png.txt", "x.tar.gz"):
        (workspace / "artifacts" / name).write_bytes(b"data")
    (workspace / "artifacts" / "ok.csv").write_bytes(b"ok")
    assert [a.name for a in collect(workspace)] == ["ok.csv"]


def test_symlink_to_a_file_outside_is_ignored(workspace: Path, outside: Path, no_fd_leak: None) -> None:
    (workspace / "artifacts" / "abs.png").symlink_to(outside / "secret.png")
    (workspace / "artifacts" / "rel.csv").symlink_to(Path("../../outside/secret.csv"))
    (workspace / "artifacts" / "passwd.csv").symlink_to("/etc/passwd")
    (workspace / "artifacts" / "dangling.json").symlink_to("/nonexistent/file.json")
    (workspace / "artifacts" / "real.json").write_bytes(b"{}")
    assert [(a.name, a.content) for a in collect(workspace)] == [("real.json", b"{}")]


def test_symlink_to_a_file_inside_is_ignored_too(workspace: Path) -> None:
    (workspace / "artifacts" / "real.csv").write_bytes(b"x")
    (workspace / "artifacts" / "alias.csv").symlink_to("real.csv")
    assert [a.name for a in collect(workspace)] == ["real.csv"]


def test_artifacts_dir_as_a_symlink_yields_nothing(workspace: Path, outside: Path, no_fd_leak: None) -> None:
    (workspace / "artifacts").rmdir()
    (workspace / "artifacts").symlink_to(outside)
    assert collect(workspace) == ()


def test_artifacts_dir_as_a_relative_symlink_yields_nothing(workspace: Path, outside: Path) -> None:
    (workspace / "artifacts").rmdir()
    (workspace / "artifacts").symlink_to(Path("..") / "outside")
    assert collect(workspace) == ()


def test_missing_artifacts_dir_yields_nothing(workspace: Path) -> None:
    (workspace / "artifacts").rmdir()
    assert collect(workspace) == ()


def test_artifacts_as_a_regular_file_yields_nothing(workspace: Path) -> None:
    (workspace / "artifacts").rmdir()
    (workspace / "artifacts").write_bytes(b"not a dir")
    assert collect(workspace) == ()


def test_special_files_are_ignored_without_blocking(workspace: Path, tmp_path: Path) -> None:
    arts = workspace / "artifacts"
    os.mkfifo(arts / "fifo.csv")  # opening it for reading would block without O_NONBLOCK
    (arts / "dir.png").mkdir()
    (arts / "dir.png" / "inner.png").write_bytes(b"nested")
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(arts / "sock.json"))
        (arts / "ok.csv").write_bytes(b"ok")
        assert [a.name for a in collect(workspace)] == ["ok.csv"]
    finally:
        sock.close()


def test_more_than_ten_are_capped_in_name_order(workspace: Path) -> None:
    for i in range(MAX_ARTIFACTS + 5):
        (workspace / "artifacts" / f"f{i:02d}.json").write_text(str(i))
    found = collect(workspace)
    assert MAX_ARTIFACTS == 10
    assert [a.name for a in found] == [f"f{i:02d}.json" for i in range(10)]


def test_ignored_files_do_not_count_towards_the_cap(workspace: Path, outside: Path) -> None:
    arts = workspace / "artifacts"
    for i in range(5):
        (arts / f"a{i}.txt").write_text("ignored")
        (arts / f"b{i}.png").symlink_to(outside / "secret.png")
    for i in range(10):
        (arts / f"c{i}.csv").write_text(str(i))
    assert [a.name for a in collect(workspace)] == [f"c{i}.csv" for i in range(10)]


def test_size_limit(workspace: Path) -> None:
    arts = workspace / "artifacts"
    with open(arts / "exact.pdf", "wb") as fh:
        fh.truncate(MAX_ARTIFACT_BYTES)  # sparse: cheap to make
    with open(arts / "huge.pdf", "wb") as fh:
        fh.truncate(MAX_ARTIFACT_BYTES + 1)
    found = collect(workspace)
    assert MAX_ARTIFACT_BYTES == 10 * 1024 * 1024
    assert [(a.name, a.size) for a in found] == [("exact.pdf", MAX_ARTIFACT_BYTES)]


def test_nested_directories_are_not_walked(workspace: Path) -> None:
    (workspace / "artifacts" / "sub").mkdir()
    (workspace / "artifacts" / "sub" / "deep.png").write_bytes(b"png")
    (workspace / "top.png").write_bytes(b"png")  # outside artifacts/
    assert collect(workspace) == ()
