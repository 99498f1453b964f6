"""Static inspection of submitted code: the cheap first check before a sandbox runs it.

Pure functions, no I/O. Two rule sets, chosen by ``SANDBOX_CODE_CHECK``: ``block``
(RAGFlow's rules, with the ways around them closed) rejects code that *names* an
obviously dangerous capability; ``guard`` rejects only what reaches for processes, native
code, dynamic code or the interpreter's internals. It is a first line of defence and a
clear error message for the user, not the security boundary: the isolation layer is.
See ``python_ast``, ``python_guard`` and ``javascript`` for the exact rules and
``docs/code-check.md`` for the user's view.

Which rule set applies to a language is the language's own declaration
(``Runtime.inspector``, looked up in the runtime registry by name or alias); the rule sets
live here, in :data:`INSPECTORS`, because rules are policy and policy is pure.
"""

from __future__ import annotations

from collections.abc import Callable

from execbox.policy.findings import Finding
from execbox.policy.javascript import inspect_javascript
from execbox.policy.python_ast import inspect_python
from execbox.policy.python_imports import imports_only_stdlib
from execbox.runtimes import find_runtime
from execbox.settings import CodeCheckMode

__all__ = ["INSPECTORS", "Finding", "imports_only_stdlib", "inspect_code"]

#: the rule sets by name (``Runtime.inspector``): code and mode -> what the rules reject
INSPECTORS: dict[str, Callable[[str, CodeCheckMode], list[Finding]]] = {
    "python": inspect_python,
    "javascript": inspect_javascript,
}


def inspect_code(code: str, language: str, mode: CodeCheckMode = CodeCheckMode.BLOCK) -> list[Finding]:
    """Inspect ``code`` written in ``language`` and return what ``mode``'s rules reject.

    ``language`` is a runtime's name or alias (case-insensitive): ``"python"``,
    ``"nodejs"`` or ``"javascript"``.
    ``guard`` applies the guard rules, ``block`` and ``warn`` the block rules (``warn``
    only reports them), ``off`` finds nothing. An empty list means the code may run.
    Raises :class:`ValueError` for any other language.
    """
    runtime = find_runtime(language)
    if runtime is None:
        raise ValueError(f"Unsupported language for static inspection: {language!r}")
    return INSPECTORS[runtime.inspector](code, mode)
