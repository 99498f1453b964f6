"""UidAllocator: one uid per live sandbox, claimed host-wide across execbox processes."""

from __future__ import annotations

from pathlib import Path

import pytest

from execbox.errors import SandboxStartError
from execbox.isolation.namespaces import UidAllocator


def test_two_allocators_sharing_a_lock_dir_never_hand_out_the_same_uid(tmp_path: Path) -> None:
    first, second = UidAllocator(500, 4, tmp_path), UidAllocator(500, 4, tmp_path)
    taken = [first.acquire(), second.acquire(), first.acquire(), second.acquire()]
    assert sorted(taken) == [500, 501, 502, 503]
    with pytest.raises(SandboxStartError, match="SANDBOX_UID_COUNT"):
        first.acquire()


def test_a_released_uid_can_be_claimed_by_another_allocator(tmp_path: Path) -> None:
    first, second = UidAllocator(700, 1, tmp_path), UidAllocator(700, 1, tmp_path)
    uid = first.acquire()
    with pytest.raises(SandboxStartError):
        second.acquire()
    first.release(uid)
    assert second.acquire() == uid
