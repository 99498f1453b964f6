"""Static inspection of submitted code: the cheap first check before a sandbox runs it.

Pure functions, no I/O. The policy rejects code that *names* an obviously dangerous
capability (process spawning, raw sockets, interpreter escape hatches, ...). It is a
first line of defence and a clear error message for the user, not the security
boundary: the isolation layer is. See ``python_ast`` and ``javascript`` for the exact
rejected lists.
"""

from __future__ import annotations

from execbox.policy.findings import Finding
from execbox.policy.javascript import inspect_javascript
from execbox.policy.python_ast import inspect_python

__all__ = ["Finding", "inspect_code"]

_PYTHON_NAMES = frozenset({"python"})
_JAVASCRIPT_NAMES = frozenset({"nodejs", "javascript"})


def inspect_code(code: str, language: str) -> list[Finding]:
    """Inspect ``code`` written in ``language`` and return what the policy rejects.

    ``language`` is ``"python"``, ``"nodejs"`` or ``"javascript"`` (case-insensitive).
    An empty list means the code may run. Raises :class:`ValueError` for any other
    language.
    """
    key = language.strip().lower()
    if key in _PYTHON_NAMES:
        return inspect_python(code)
    if key in _JAVASCRIPT_NAMES:
        return inspect_javascript(code)
    raise ValueError(f"Unsupported language for static inspection: {language!r}")
