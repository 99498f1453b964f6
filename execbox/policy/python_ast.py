"""AST-based inspection of Python code.

Rejects what RAGFlow's sandbox analyzer rejects, without its false positives:

* **Imports** of a module in :data:`BLOCKED_MODULES` or of any submodule of one, in
  every form: ``import x``, ``import x.y``, ``from x import y``, ``from x.y import z``
  and ``from x import y`` where ``x.y`` is blocked (``from http import client``).
  ``os.path`` counts as ``os``; ``http.client`` is blocked but ``http`` alone and
  ``http.cookies`` are not. Relative imports (``from . import x``) are never blocked.
* **Calls** of a builtin in :data:`BLOCKED_CALLS`, by bare name (``eval(s)``) or as an
  attribute of ``builtins`` / ``__builtins__`` (``builtins.eval(s)``). Method calls on
  arbitrary objects (``df.eval("a+b")``, ``re.compile(p)``, ``fh.open()``) are allowed.
* **Uses** of such a builtin as a value (``f = eval``, ``map(getattr, ...)``), unless the
  program binds that name itself somewhere (a parameter, assignment, def, import...):
  ``def main(input): return input.upper()`` is allowed.
* **Attribute access** to an interpreter escape hatch in :data:`BLOCKED_ATTRIBUTES`
  (``().__class__.__base__.__subclasses__()``, ``f.__globals__``, ``g.gi_frame``), and
  any use of the name ``__builtins__``.

Not rejected (RAGFlow's false positives): constant arithmetic (``1 + 2``, ``'a' + 'b'``),
f-strings, string literals (``"os.system"``), identifiers that merely contain a blocked
word (``open_file``, ``os_version``), and ordinary libraries (numpy, pandas, json, re...).

Code that does not parse yields no findings: the program then runs and reports its own
``SyntaxError``, which is the more useful message for the user. The one exception is
code nested too deeply for the parser (``RecursionError``): that fails closed with a
single :data:`TOO_DEEP_MESSAGE` finding on line 1.

This is a first line of defence, not the security boundary; filesystem and network
access (``pathlib``, ``io.open``, ``urllib``) are left to the isolation layer.
"""

from __future__ import annotations

import ast

from execbox.policy.findings import Finding, collect_findings

__all__ = [
    "BLOCKED_ATTRIBUTES",
    "BLOCKED_CALLS",
    "BLOCKED_MODULES",
    "TOO_DEEP_MESSAGE",
    "inspect_python",
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

_BUILTINS_MODULES: frozenset[str] = frozenset({"builtins", "__builtins__"})

_Hit = tuple[int, int, str]


def inspect_python(code: str) -> list[Finding]:
    """Return the constructs in ``code`` that the policy rejects.

    Findings are sorted by line and deduplicated. Code that does not parse returns
    ``[]`` (the run itself reports the ``SyntaxError``); code nested too deeply to
    parse returns one :data:`TOO_DEEP_MESSAGE` finding.
    """
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        # ValueError: null bytes. The interpreter's own compile step fails the same way.
        return []
    except (RecursionError, MemoryError):
        # Nesting too deep to inspect. Fail closed: another interpreter version (the
        # sandbox's) might still compile what this one cannot parse.
        return [Finding(line=1, message=TOO_DEEP_MESSAGE)]

    # ast.walk is iterative, so deeply nested (but parseable) code cannot crash it.
    nodes = list(ast.walk(tree))
    bound = _bound_names(nodes)
    call_targets = {id(node.func) for node in nodes if isinstance(node, ast.Call)}

    hits: list[_Hit] = []
    for node in nodes:
        if isinstance(node, ast.Import):
            hits.extend(_check_import(node))
        elif isinstance(node, ast.ImportFrom):
            hits.extend(_check_import_from(node))
        elif isinstance(node, ast.Name):
            hits.extend(_check_name(node, called=id(node) in call_targets, bound=bound))
        elif isinstance(node, ast.Attribute):
            hits.extend(_check_attribute(node, called=id(node) in call_targets))
    return collect_findings(hits)


def _blocked_module(name: str) -> bool:
    """True if ``name`` is a blocked module or a submodule of one."""
    parts = name.split(".")
    return any(".".join(parts[:i]) in BLOCKED_MODULES for i in range(1, len(parts) + 1))


def _import_message(name: str) -> str:
    return f"Import of '{name}' is not allowed"


def _check_import(node: ast.Import) -> list[_Hit]:
    return [
        (alias.lineno, alias.col_offset, _import_message(alias.name))
        for alias in node.names
        if _blocked_module(alias.name)
    ]


def _check_import_from(node: ast.ImportFrom) -> list[_Hit]:
    if node.level or not node.module:
        return []  # relative import: the user's own files, never a stdlib module
    if _blocked_module(node.module):
        return [(node.lineno, node.col_offset, _import_message(node.module))]
    hits: list[_Hit] = []
    for alias in node.names:
        full = f"{node.module}.{alias.name}"
        if alias.name != "*" and _blocked_module(full):
            hits.append((alias.lineno, alias.col_offset, _import_message(full)))
    return hits


def _check_name(node: ast.Name, *, called: bool, bound: frozenset[str]) -> list[_Hit]:
    where = (node.lineno, node.col_offset)
    if node.id == "__builtins__":
        return [(*where, "Access to '__builtins__' is not allowed")]
    if node.id not in BLOCKED_CALLS or not isinstance(node.ctx, ast.Load):
        return []
    if called:
        return [(*where, f"Call of '{node.id}' is not allowed")]
    if node.id not in bound:
        return [(*where, f"Use of '{node.id}' is not allowed")]
    return []


def _check_attribute(node: ast.Attribute, *, called: bool) -> list[_Hit]:
    where = (node.lineno, node.col_offset)
    base = node.value
    if (
        isinstance(base, ast.Name)
        and base.id in _BUILTINS_MODULES
        and node.attr in BLOCKED_CALLS
    ):
        verb = "Call" if called else "Use"
        return [(*where, f"{verb} of '{base.id}.{node.attr}' is not allowed")]
    if node.attr in BLOCKED_ATTRIBUTES:
        return [(*where, f"Access to '{node.attr}' is not allowed")]
    return []


def _bound_names(nodes: list[ast.AST]) -> frozenset[str]:
    """Every name the program binds anywhere (scope-insensitive, deliberately simple)."""
    names: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
            names.add(node.id)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.alias):
            names.add(node.asname or node.name.split(".")[0])
        elif isinstance(node, ast.ExceptHandler) and node.name:
            names.add(node.name)
        elif isinstance(node, (ast.MatchAs, ast.MatchStar)) and node.name:
            names.add(node.name)
        elif isinstance(node, ast.MatchMapping) and node.rest:
            names.add(node.rest)
    return frozenset(names)
