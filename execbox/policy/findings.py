"""The unit of output of static inspection: one rejected construct at one line.

A :class:`Finding` is rendered as ``Line N: <message>``; the service joins these
lines into the stderr of a rejected run (see ``API.md``, status -999).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["Finding", "collect_findings"]


@dataclass(frozen=True)
class Finding:
    """One construct the policy rejects.

    ``line`` is 1-based; ``message`` is short and names the construct,
    e.g. ``Import of 'os' is not allowed``.
    """

    line: int
    message: str

    def __str__(self) -> str:
        return f"Line {self.line}: {self.message}"


def collect_findings(hits: Iterable[tuple[int, int, str]]) -> list[Finding]:
    """Turn raw ``(line, column, message)`` hits into findings.

    The result is sorted by line (then by column of first appearance within the
    line) and contains each ``(line, message)`` pair once.
    """
    seen: set[tuple[int, str]] = set()
    result: list[Finding] = []
    for line, _column, message in sorted(hits):
        if (line, message) not in seen:
            seen.add((line, message))
            result.append(Finding(line=line, message=message))
    return result
