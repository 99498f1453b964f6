"""Files under artifacts/ that are left out of the answer are listed with the reason (issue 9,
finding 8), and a name that is not UTF-8 is reported, never fatal (finding 1)."""

from __future__ import annotations

import os
from pathlib import Path

from execbox.artifacts import MAX_ARTIFACT_BYTES, MAX_ARTIFACTS, collect_artifacts_report


def collect(ws: Path):  # type: ignore[no-untyped-def]
    fd = os.open(ws, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return collect_artifacts_report(fd)
    finally:
        os.close(fd)


def test_every_file_left_out_is_listed_with_its_reason(tmp_path: Path) -> None:
    arts = tmp_path / "artifacts"
    arts.mkdir()
    for i in range(MAX_ARTIFACTS + 2):
        (arts / f"f{i:02d}.json").write_text(str(i))
    with open(arts / "a-big.pdf", "wb") as fh:
        fh.truncate(MAX_ARTIFACT_BYTES + 1)
    (arts / "a-notes.txt").write_text("x")
    (arts / "a-link.png").symlink_to("/etc/passwd")
    with open(os.path.join(os.fsencode(arts), b"a-bad\xff.png"), "wb") as fh:
        fh.write(b"png")
    found, skipped = collect(tmp_path)
    assert len(found) == MAX_ARTIFACTS
    reasons = {s.name: s.reason for s in skipped}
    assert "larger than" in reasons["a-big.pdf"]
    assert "not allowed" in reasons["a-notes.txt"]
    assert "symbolic link" in reasons["a-link.png"]
    assert reasons["a-bad\ufffd.png"] == "the file name is not valid UTF-8"
    over = [name for name, reason in reasons.items() if "more than 10 artifacts" in reason]
    assert sorted(over) == ["f10.json", "f11.json"]
    for item in skipped:
        item.name.encode("utf-8")  # always encodable
