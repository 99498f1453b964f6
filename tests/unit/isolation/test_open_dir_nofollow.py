"""open_dir_nofollow: a directory opened by name, never through a symlink (gVisor's kernel
follows one given O_DIRECTORY | O_NOFOLLOW; this helper does not rely on that flag pair)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from execbox.isolation.hostproc import open_dir_nofollow


def test_a_directory_opens_and_a_symlink_to_one_does_not(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "inside").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    (tmp_path / "file").write_text("x")
    parent = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fd = open_dir_nofollow("real", parent)
        try:
            assert os.listdir(fd) == ["inside"]
            assert not os.get_inheritable(fd)
        finally:
            os.close(fd)
        for name in ("link", "file"):
            with pytest.raises(OSError) as refused:
                open_dir_nofollow(name, parent)
            assert refused.value.errno == errno.ENOTDIR
        with pytest.raises(FileNotFoundError):
            open_dir_nofollow("missing", parent)
    finally:
        os.close(parent)
