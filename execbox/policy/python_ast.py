"""AST-based inspection of Python code, under the ``block`` or the ``guard`` rules.

**block** (the default) rejects what RAGFlow's sandbox analyzer rejects, without its
false positives, and closes the ways around it:

* **Imports** of a module in :data:`BLOCKED_MODULES` or of any submodule of one, in
  every form: ``import x``, ``import x.y``, ``from x import y``, ``from x.y import z``
  and ``from x import y`` where ``x.y`` is blocked (``from http import client``).
  ``os.path`` counts as ``os``; ``http.client`` is blocked but ``http`` alone and
  ``http.cookies`` are not. Relative imports (``from . import x``) are never blocked.
  Rule ``import``.
* **Calls** of a builtin in :data:`BLOCKED_CALLS`, by bare name (``eval(s)``) or as an
  attribute of ``builtins`` / ``__builtins__`` (``builtins.eval(s)``). Method calls on
  arbitrary objects (``df.eval("a+b")``, ``re.compile(p)``, ``fh.open()``) are allowed.
  **Uses** of such a builtin as a value (``f = eval``, ``map(getattr, ...)``), unless the
  program binds that name itself somewhere: ``def main(input): ...`` is allowed.
  Rule ``builtin``.
* **Attribute access** to an interpreter escape hatch in :data:`BLOCKED_ATTRIBUTES`
  (``().__class__.__base__.__subclasses__()``, ``f.__globals__``, ``g.gi_frame``), any use
  of the name ``__builtins__``, and subscripts with such a name as a literal key
  (``d['__builtins__']``). Rule ``internals``.
* **Reaching a blocked module through another one**: an attribute named after one of
  :data:`~execbox.policy.python_scope.REACH_NAMES` (``pathlib.os``, ``shutil.os``,
  ``tempfile._os``, ``x.posix``, ``x.subprocess``) or ``from pathlib import os``.
  Rule ``module-chain``.
* **Source given as a string** to ``timeit.timeit``/``repeat``/``Timer`` or
  ``cProfile.run``/``runctx``: a literal is inspected with these rules, anything else is
  rejected (rule ``dynamic-code``).
* **Attribute or module names given as strings** to ``operator.attrgetter``,
  ``operator.methodcaller``, ``pkgutil.resolve_name`` or ``pydoc.locate``: computed
  names are rejected (rule ``computed-name``), literal ones are checked like the
  attribute or import they stand for.

Not rejected (RAGFlow's false positives): constant arithmetic (``1 + 2``, ``'a' + 'b'``),
f-strings, string literals (``"os.system"``), comments, identifiers that merely contain a
blocked word (``open_file``, ``os_version``), and ordinary libraries (numpy, pandas...).

**guard** rejects only what reaches for processes, native code, dynamic code or the
interpreter's internals and lets everyday code through; its rules are in
:mod:`execbox.policy.python_guard`.

Code that does not parse yields no findings: the program then runs and reports its own
``SyntaxError``, which is the more useful message for the user. The one exception is
code nested too deeply for the parser (``RecursionError``): that fails closed with a
single :data:`TOO_DEEP_MESSAGE` finding on line 1.

This is a first line of defence, not the security boundary; filesystem and network
access (``pathlib``, ``io.open``, ``urllib``) are left to the isolation layer.
"""

from __future__ import annotations

import ast

from execbox.policy.findings import Finding, Hit, collect_findings
from execbox.policy.python_guard import SOURCE_FUNCTIONS, check_source_function, guard_hits, guard_path_rule
from execbox.policy.python_scope import REACH_NAMES, Scope, literal_text
from execbox.settings import CodeCheckMode

__all__ = [
    "BLOCKED_ATTRIBUTES",
    "BLOCKED_CALLS",
    "BLOCKED_MODULES",
    "STRING_NAME_FUNCTIONS",
    "TOO_DEEP_MESSAGE",
    "inspect_python",
    "python_hits",
]

#: Modules whose import (or import of any submodule) is rejected. The first line is
#: RAGFlow's list; the rest are further ways to spawn processes, load native code,
#: reach the interpreter's internals or run code from strings.
BLOCKED_MODULES: frozenset[str] = frozenset(
    {
        "os", "subprocess", "sys", "shutil", "socket", "ctypes", "pickle", "threading",
        "multiprocessing", "asyncio", "http.client", "ftplib", "telnetlib", "builtins",
        "importlib", "marshal", "signal", "pty", "resource", "fcntl", "posix", "nt",
        "_thread", "gc", "inspect", "code", "codeop", "runpy", "pdb",
        "_posixsubprocess", "_ctypes", "_socket", "_pickle", "_multiprocessing",
        "_signal", "_winapi",
    }
)  # fmt: skip

#: Builtins whose call (by bare name or via ``builtins``/``__builtins__``) is rejected.
BLOCKED_CALLS: frozenset[str] = frozenset(
    {
        "eval", "exec", "compile", "__import__", "open", "input", "getattr", "setattr",
        "delattr", "globals", "locals", "vars", "breakpoint", "memoryview",
    }
)  # fmt: skip

#: Attribute names whose access is rejected on any object: the introspection hooks
#: used to climb from an ordinary value to the interpreter's globals, builtins, code
#: objects or frames. ``__dict__`` is here because ``type.__dict__['__subclasses__']``
#: reaches the same place as ``__subclasses__``. ``__class__`` is deliberately absent:
#: ``type(x)`` gives the same object and ``x.__class__.__name__`` is common and harmless.
BLOCKED_ATTRIBUTES: frozenset[str] = frozenset(
    {
        # class hierarchy and attribute machinery
        "__subclasses__", "__bases__", "__base__", "__mro__", "__dict__",
        "__getattribute__",
        # function / method internals
        "__globals__", "__builtins__", "__code__", "__closure__", "__self__",
        # module loading internals
        "__loader__", "__spec__", "__import__",
        # frames, reachable from generators, coroutines and tracebacks
        "__traceback__", "tb_frame", "gi_frame", "gi_code", "cr_frame", "cr_code",
        "ag_frame", "ag_code", "f_globals", "f_locals", "f_builtins", "f_back",
        "f_code",
    }
)  # fmt: skip

#: The single finding for code nested too deeply for the parser to build its AST.
TOO_DEEP_MESSAGE = "Code is too deeply nested to inspect"

#: Functions that turn a string into an attribute access (``attr``) or a dotted import
#: path (``path``); their string argument is checked like the attribute or import.
STRING_NAME_FUNCTIONS: dict[str, str] = {
    "operator.attrgetter": "attr", "_operator.attrgetter": "attr",
    "operator.methodcaller": "attr", "_operator.methodcaller": "attr",
    "pkgutil.resolve_name": "path", "pydoc.locate": "path",
}  # fmt: skip

_BUILTINS_MODULES: frozenset[str] = frozenset({"builtins", "__builtins__"})


def inspect_python(code: str, mode: CodeCheckMode = CodeCheckMode.BLOCK) -> list[Finding]:
    """Return the constructs in ``code`` that the policy rejects under ``mode``.

    ``guard`` applies the guard rules; ``block`` and ``warn`` the block rules (``warn``
    reports what ``block`` would reject); ``off`` finds nothing. Findings are sorted by
    line and deduplicated. Code that does not parse returns ``[]`` (the run itself
    reports the ``SyntaxError``); code nested too deeply to parse returns one
    :data:`TOO_DEEP_MESSAGE` finding.
    """
    if mode is CodeCheckMode.OFF:
        return []
    return collect_findings(python_hits(code, mode, depth=0))


def python_hits(code: str, mode: CodeCheckMode, depth: int) -> list[Hit]:
    """The raw hits of :func:`inspect_python`; ``depth`` counts nested literal sources
    (``exec("...")``) already being inspected, for the guard rules."""
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        # ValueError: null bytes. The interpreter's own compile step fails the same way.
        return []
    except (RecursionError, MemoryError):
        # Nesting too deep to inspect. Fail closed: another interpreter version (the
        # sandbox's) might still compile what this one cannot parse.
        return [(1, 0, TOO_DEEP_MESSAGE, "too-deep")]
    scope = Scope(tree)
    hits = _shared_hits(scope, mode)

    def reinspect(source: str, level: int) -> list[Hit]:
        return python_hits(source, mode, level)

    if mode is CodeCheckMode.GUARD:
        hits.extend(guard_hits(scope, depth, reinspect))
    else:
        hits.extend(_block_hits(scope))
        for node in scope.nodes:  # timeit.timeit("..."): block's import rules on the string
            if isinstance(node, ast.Call) and (path := scope.resolve(node.func)) in SOURCE_FUNCTIONS:
                hits.extend(check_source_function(scope, node, path, depth, reinspect))
    return hits


# -- rules of both modes ----------------------------------------------------------


def _shared_hits(scope: Scope, mode: CodeCheckMode) -> list[Hit]:
    hits: list[Hit] = []
    for node in scope.nodes:
        if isinstance(node, ast.Name) and node.id == "__builtins__":
            hits.append((node.lineno, node.col_offset, "Access to '__builtins__' is not allowed", "internals"))
        elif isinstance(node, ast.Subscript):
            key = literal_text(node.slice)
            if key in BLOCKED_ATTRIBUTES and key.startswith("__") and key != "__dict__":
                hits.append((node.lineno, node.col_offset, f"Access to '{key}' is not allowed", "internals"))
        elif isinstance(node, ast.Call):
            hits.extend(_check_string_names(scope, node, mode))
    return hits


def _check_string_names(scope: Scope, node: ast.Call, mode: CodeCheckMode) -> list[Hit]:
    path = scope.resolve(node.func)
    kind = STRING_NAME_FUNCTIONS.get(path or "")
    if kind is None:
        return []
    where = (node.lineno, node.col_offset)
    name = path.rsplit(".", 1)[1]
    arguments = node.args[:1] if name == "methodcaller" else node.args
    texts = [literal_text(arg) for arg in arguments]
    if any(text is None for text in texts) or node.keywords and name != "methodcaller":
        return [(*where, f"'{name}' with a computed name is not allowed", "computed-name")]
    hits: list[Hit] = []
    for text in texts:
        assert text is not None
        dotted = text.replace(":", ".")
        if kind == "attr":  # the object is unknown: any step to a sensitive module counts
            reached = any(p in REACH_NAMES or p in BLOCKED_ATTRIBUTES for p in dotted.split("."))
        elif mode is CodeCheckMode.GUARD:
            reached = guard_path_rule(dotted) is not None
        else:
            reached = _blocked_module(dotted) or any(p in REACH_NAMES for p in dotted.split("."))
        if reached:
            hits.append((*where, f"'{name}' of '{text}' is not allowed", "module-chain"))
    return hits


# -- block ------------------------------------------------------------------------


def _block_hits(scope: Scope) -> list[Hit]:
    call_targets = {id(node.func) for node in scope.nodes if isinstance(node, ast.Call)}
    hits: list[Hit] = []
    for node in scope.nodes:
        if isinstance(node, ast.Import):
            hits.extend(_check_import(node))
        elif isinstance(node, ast.ImportFrom):
            hits.extend(_check_import_from(node))
        elif isinstance(node, ast.Name):
            hits.extend(_check_name(node, called=id(node) in call_targets, bound=scope.bound))
        elif isinstance(node, ast.Attribute):
            hits.extend(_check_attribute(node, called=id(node) in call_targets))
    return hits


def _blocked_module(name: str) -> bool:
    """True if ``name`` is a blocked module or a submodule of one."""
    parts = name.split(".")
    return any(".".join(parts[:i]) in BLOCKED_MODULES for i in range(1, len(parts) + 1))


def _import_message(name: str) -> str:
    return f"Import of '{name}' is not allowed"


def _check_import(node: ast.Import) -> list[Hit]:
    return [
        (alias.lineno, alias.col_offset, _import_message(alias.name), "import")
        for alias in node.names
        if _blocked_module(alias.name)
    ]


def _check_import_from(node: ast.ImportFrom) -> list[Hit]:
    if node.level or not node.module:
        return []  # relative import: the user's own files, never a stdlib module
    if _blocked_module(node.module):
        return [(node.lineno, node.col_offset, _import_message(node.module), "import")]
    hits: list[Hit] = []
    for alias in node.names:
        full = f"{node.module}.{alias.name}"
        if alias.name == "*":
            continue
        if _blocked_module(full):
            hits.append((alias.lineno, alias.col_offset, _import_message(full), "import"))
        elif alias.name in REACH_NAMES:  # from pathlib import os
            hits.append((alias.lineno, alias.col_offset, _import_message(full), "module-chain"))
    return hits


def _check_name(node: ast.Name, *, called: bool, bound: frozenset[str]) -> list[Hit]:
    where = (node.lineno, node.col_offset)
    if node.id not in BLOCKED_CALLS or not isinstance(node.ctx, ast.Load):
        return []
    if called:
        return [(*where, f"Call of '{node.id}' is not allowed", "builtin")]
    if node.id not in bound:
        return [(*where, f"Use of '{node.id}' is not allowed", "builtin")]
    return []


def _check_attribute(node: ast.Attribute, *, called: bool) -> list[Hit]:
    where = (node.lineno, node.col_offset)
    base = node.value
    if (
        isinstance(base, ast.Name)
        and base.id in _BUILTINS_MODULES
        and node.attr in BLOCKED_CALLS
    ):
        verb = "Call" if called else "Use"
        return [(*where, f"{verb} of '{base.id}.{node.attr}' is not allowed", "builtin")]
    if node.attr in BLOCKED_ATTRIBUTES:
        return [(*where, f"Access to '{node.attr}' is not allowed", "internals")]
    if node.attr in REACH_NAMES:  # pathlib.os, shutil.os, tempfile._os
        return [(*where, f"Access to '{node.attr}' through another module is not allowed", "module-chain")]
    return []
