"""The unit of output of static inspection: one rejected construct at one line.

A :class:`Finding` is rendered as ``Line N: <message> [<rule>]``; the service joins these
lines into the stderr of a rejected run (see ``docs/code-check.md``, status -999). The
rule names the family of the finding (``import``, ``process``, ``dynamic-code``, ...), so
a user can look up why it was rejected; ``docs/code-check.md`` lists every rule.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

__all__ = ["Finding", "Hit", "collect_findings"]

#: one raw finding of a rule: (line, column, message, rule)
Hit = tuple[int, int, str, str]


@dataclass(frozen=True)
class Finding:
    """One construct the policy rejects.

    ``line`` is 1-based; ``message`` is short and names the construct,
    e.g. ``Import of 'os' is not allowed``; ``rule`` names the rule that rejected it.
    Two findings are equal when their line and message are: the rule is what explains
    a message, not part of its identity.
    """

    line: int
    message: str
    rule: str = field(default="", compare=False)

    def __str__(self) -> str:
        suffix = f" [{self.rule}]" if self.rule else ""
        return f"Line {self.line}: {self.message}{suffix}"


def collect_findings(hits: Iterable[Hit]) -> list[Finding]:
    """Turn raw ``(line, column, message, rule)`` hits into findings.

    The result is sorted by line (then by column of first appearance within the
    line) and contains each ``(line, message)`` pair once.
    """
    seen: set[tuple[int, str]] = set()
    result: list[Finding] = []
    for line, _column, message, rule in sorted(hits):
        if (line, message) not in seen:
            seen.add((line, message))
            result.append(Finding(line=line, message=message, rule=rule))
    return result
