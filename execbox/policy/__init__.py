"""Static inspection of submitted code: the cheap first check before a sandbox runs it.

Pure functions, no I/O. Two rule sets, chosen by ``SANDBOX_CODE_CHECK``: ``block``
(RAGFlow's rules, with the ways around them closed) rejects code that *names* an
obviously dangerous capability; ``guard`` rejects only what reaches for processes, native
code, dynamic code or the interpreter's internals. It is a first line of defence and a
clear error message for the user, not the security boundary: the isolation layer is.
See ``python_ast``, ``python_guard`` and ``javascript`` for the exact rules and
``docs/code-check.md`` for the user's view.
"""

from __future__ import annotations

from execbox.policy.findings import Finding
from execbox.policy.javascript import inspect_javascript
from execbox.policy.python_ast import inspect_python
from execbox.settings import CodeCheckMode

__all__ = ["Finding", "inspect_code"]

_PYTHON_NAMES = frozenset({"python"})
_JAVASCRIPT_NAMES = frozenset({"nodejs", "javascript"})


def inspect_code(code: str, language: str, mode: CodeCheckMode = CodeCheckMode.BLOCK) -> list[Finding]:
    """Inspect ``code`` written in ``language`` and return what ``mode``'s rules reject.

    ``language`` is ``"python"``, ``"nodejs"`` or ``"javascript"`` (case-insensitive).
    ``guard`` applies the guard rules, ``block`` and ``warn`` the block rules (``warn``
    only reports them), ``off`` finds nothing. An empty list means the code may run.
    Raises :class:`ValueError` for any other language.
    """
    key = language.strip().lower()
    if key in _PYTHON_NAMES:
        return inspect_python(code, mode)
    if key in _JAVASCRIPT_NAMES:
        return inspect_javascript(code, mode)
    raise ValueError(f"Unsupported language for static inspection: {language!r}")
