"""Which Python code needs the preloaded modules: read from its imports, statically.

The fork server imports ``SANDBOX_PYTHON_PRELOAD`` (numpy, pandas, matplotlib) once so
that code using them pays nothing for the import; but every sandbox forked from that big
process costs more to prepare (copying its page tables, then its pages as they are
written: 3-5 ms on the host, 35-60 ms inside gVisor, against 1 ms and 9-13 ms for a
Python without them). Code that imports only the standard library gains nothing from the
preload, so the executor runs it in a sandbox of the *light* pool (no preload).

The answer only picks the cheaper sandbox; it never decides what code may do: a light
sandbox runs any code, and code that reaches a third-party module by a way this reading
does not see (a module name built at run time) imports it there at its usual cost.
Dynamic imports that are plain to see (``__import__``, ``importlib``, ``exec``...) send
the code to the preloaded pool.
"""

from __future__ import annotations

import ast
import sys

__all__ = ["imports_only_stdlib"]

#: modules and names through which code imports what it names at run time
_DYNAMIC_MODULES = frozenset({"importlib", "runpy", "pkgutil", "zipimport", "code", "codeop"})
_DYNAMIC_NAMES = frozenset({"__import__", "exec", "eval", "compile", "__builtins__"})
_DYNAMIC_ATTRIBUTES = frozenset({"__import__", "import_module", "__builtins__"})
#: the standard library of the interpreter the sandboxes run (the service's is the same
#: CPython version: the runtime environment is a venv of it)
_STDLIB = frozenset(sys.stdlib_module_names) - _DYNAMIC_MODULES


def imports_only_stdlib(code: str) -> bool:
    """Whether ``code`` imports nothing but standard-library modules (``__future__``
    included) and names no way to import at run time. Code that does not parse is light
    too: it fails the same way in either sandbox."""
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return True
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            if any(alias.name.partition(".")[0] not in _STDLIB for alias in node.names):
                return False
        elif isinstance(node, ast.ImportFrom):
            if node.level or (node.module or "").partition(".")[0] not in _STDLIB:
                return False
        elif isinstance(node, ast.Name) and node.id in _DYNAMIC_NAMES:
            return False
        elif isinstance(node, ast.Attribute) and node.attr in _DYNAMIC_ATTRIBUTES:
            return False
    return True
