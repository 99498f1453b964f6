"""Pattern-based (regular expression) inspection of JavaScript / Node.js code.

Rejected, each reported at the 1-based line where the match starts:

* **Loading a module** in :data:`BLOCKED_MODULES` (or a subpath of one, such as
  ``fs/promises``), with or without the ``node:`` prefix, in single, double or backtick
  quotes, with any whitespace, via ``require(...)``, dynamic ``import(...)``, static
  ``import ... from``, bare ``import '...'`` or ``export ... from``.
* **``eval``** as a whole word (``eval(s)``, ``globalThis.eval(s)``, ``(0, eval)(s)``).
* **The ``Function`` constructor**: ``Function(...)``, ``new Function``.
* **Dangerous ``process`` members** in :data:`BLOCKED_PROCESS_MEMBERS`, as
  ``process.x`` or ``process['x']``.

Words are matched as whole JavaScript identifiers: ``myeval(``, ``evaluate(``,
``isFunction(``, ``AsyncFunctionRunner(`` and ``$eval`` are not flagged. Being regular
expressions, the patterns do not know about comments and string literals, so a match
inside either *is* flagged (``// never eval input``); that is accepted as the price of a
simple, predictable check. Modules not listed are allowed, notably ``os`` (read-only
host facts; the sandbox hides the host anyway), ``http``/``https`` (network is the
isolation layer's decision), ``crypto``, ``path``, ``util``, ``axios`` and ``lodash``.

This is a first line of defence, not the security boundary: computed names
(``require('child' + '_process')``) are out of reach of any pattern.
"""

from __future__ import annotations

import bisect
import re

from execbox.policy.findings import Finding, collect_findings

__all__ = ["BLOCKED_MODULES", "BLOCKED_PROCESS_MEMBERS", "inspect_javascript"]

#: Node core modules whose loading is rejected (also any ``name/subpath``).
BLOCKED_MODULES: tuple[str, ...] = (
    "child_process",
    "cluster",
    "dgram",
    "fs",
    "inspector",
    "module",
    "net",
    "repl",
    "v8",
    "vm",
    "wasi",
    "worker_threads",
)

#: Members of the global ``process`` object whose access is rejected.
BLOCKED_PROCESS_MEMBERS: tuple[str, ...] = (
    "_linkedBinding",
    "binding",
    "dlopen",
    "kill",
    "mainModule",
    "setegid",
    "seteuid",
    "setgid",
    "setgroups",
    "setuid",
)

# Not preceded / followed by an identifier character ($ is one in JavaScript).
_START = r"(?<![\w$])"
_END = r"(?![\w$])"
_MODULES = "|".join(re.escape(name) for name in BLOCKED_MODULES)
# A quoted module specifier: opening quote, optional node:, a blocked name with an
# optional /subpath, and the same closing quote. Group "spec" is what is reported.
_SPEC = rf"""(?P<q>['"`])(?:node:)?(?P<spec>(?:{_MODULES})(?:/[^'"`\s]*)?)(?P=q)"""

_MODULE_PATTERNS: tuple[re.Pattern[str], ...] = (
    # require('fs'), module.require("fs")
    re.compile(rf"{_START}require\s*\(\s*{_SPEC}\s*\)"),
    # import('fs')
    re.compile(rf"{_START}import\s*\(\s*{_SPEC}\s*\)"),
    # import 'fs'
    re.compile(rf"{_START}import\s*{_SPEC}"),
    # import fs from 'fs'; import { x } from "node:fs"; export * from 'fs'.
    # Anchored on `from` (linear time); `from` directly followed by a quoted
    # specifier occurs only in import/export statements. Must stay last: see
    # _statement_start, which moves the reported position to the keyword.
    re.compile(rf"{_START}from\s*{_SPEC}"),
)

_STATEMENT_KEYWORD = re.compile(rf"{_START}(?:import|export){_END}")
_CLAUSE_BOUNDARIES = (";", "'", '"', "`")
_CLAUSE_WINDOW = 4096  # how far back from `from` to look for its import/export

_NAMED_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(rf"{_START}eval{_END}"), "Use of 'eval' is not allowed"),
    (
        re.compile(rf"{_START}(?:Function\s*\(|new\s+Function{_END})"),
        "Use of 'Function' is not allowed",
    ),
)

_MEMBERS = "|".join(re.escape(name) for name in BLOCKED_PROCESS_MEMBERS)
_PROCESS_PATTERN = re.compile(
    rf"""{_START}process\s*(?:\.\s*(?P<dot>{_MEMBERS}){_END}"""
    rf"""|\[\s*(?P<q>['"`])(?P<key>{_MEMBERS})(?P=q)\s*\])"""
)

_LINE_BREAK = re.compile(r"\r\n|[\n\r\u2028\u2029]")


def inspect_javascript(code: str) -> list[Finding]:
    """Return the constructs in ``code`` that the policy rejects.

    Findings are sorted by line and deduplicated. Matches inside comments and string
    literals are reported too (see the module docstring).
    """
    line_starts = [0] + [m.end() for m in _LINE_BREAK.finditer(code)]

    def where(offset: int) -> tuple[int, int]:
        index = bisect.bisect_right(line_starts, offset) - 1
        return index + 1, offset - line_starts[index]

    hits: list[tuple[int, int, str]] = []
    for index, pattern in enumerate(_MODULE_PATTERNS):
        is_from = index == len(_MODULE_PATTERNS) - 1
        for match in pattern.finditer(code):
            start = _statement_start(code, match.start()) if is_from else match.start()
            spec = match.group("spec")
            hits.append((*where(start), f"Import of '{spec}' is not allowed"))
    for pattern, message in _NAMED_PATTERNS:
        for match in pattern.finditer(code):
            hits.append((*where(match.start()), message))
    for match in _PROCESS_PATTERN.finditer(code):
        member = match.group("dot") or match.group("key")
        hits.append((*where(match.start()), f"Access to 'process.{member}' is not allowed"))
    return collect_findings(hits)


def _statement_start(code: str, from_offset: int) -> int:
    """Offset of the ``import``/``export`` keyword owning the ``from`` at ``from_offset``.

    The clause between the keyword and ``from`` holds no ``;`` or quote; if no keyword
    is found within :data:`_CLAUSE_WINDOW` characters, ``from_offset`` itself.
    """
    floor = max(0, from_offset - _CLAUSE_WINDOW)
    boundary = max(code.rfind(char, floor, from_offset) for char in _CLAUSE_BOUNDARIES)
    keyword = _STATEMENT_KEYWORD.search(code, max(floor, boundary + 1), from_offset)
    return keyword.start() if keyword else from_offset
