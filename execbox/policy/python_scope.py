"""What the Python rules need to know about a whole program: names, aliases, chains.

One :class:`Scope` is built per inspected program from its AST, flow-insensitively and
deliberately simply (one namespace for the whole file). It answers:

* which names the program binds itself (parameters, assignments, defs, ...);
* which names stand for a module or a module member, and which one: ``import os as o``
  makes ``o`` stand for ``os``, ``from os import system as s`` makes ``s`` stand for
  ``os.system``, ``m = pathlib.os`` makes ``m`` stand for ``os``;
* what dotted path an expression such as ``o.path.join`` or ``pathlib.os.popen`` reaches,
  *canonically*: a chain that passes through an attribute named after a sensitive module
  (``pathlib.os``, ``shutil.os``, ``tempfile._os``, ``x.posix``) is taken to reach that
  module, so ``pathlib.os.popen`` resolves to ``os.popen`` whatever ``pathlib`` is.
  ``getattr(x, 'name')`` with a literal name counts as ``x.name``, and
  ``__import__('os')`` / ``importlib.import_module('os')`` as the module ``os``.
"""

from __future__ import annotations

import ast

__all__ = ["REACH_NAMES", "Scope", "literal_text"]

#: Attribute (or imported) names that are, in the standard library, another name for a
#: sensitive module, mapped to that module. ``pathlib.os``, ``shutil.os``, ``tempfile._os``
#: and ``os.posix``-like chains reach these without an ``import`` statement.
REACH_NAMES: dict[str, str] = {
    "os": "os", "_os": "os", "posix": "os", "nt": "os",
    "subprocess": "subprocess", "_subprocess": "subprocess",
    "_posixsubprocess": "_posixsubprocess",
    "pty": "pty",
    "ctypes": "ctypes", "_ctypes": "ctypes",
    "sys": "sys", "_sys": "sys",
    "builtins": "builtins", "_builtins": "builtins", "__builtins__": "builtins",
    "multiprocessing": "multiprocessing", "_multiprocessing": "multiprocessing",
    "importlib": "importlib", "_imp": "_imp",
}  # fmt: skip

_IMPORT_FUNCTIONS = frozenset({"builtins.__import__", "importlib.import_module", "importlib.__import__"})


def literal_text(node: ast.AST | None) -> str | None:
    """The value of a plain ``str`` (or ASCII-decodable ``bytes``) literal, else None.

    Anything computed (``"o" + "s"``, f-strings, ``b"os".decode()``, ``chr(111)``) is
    None: the rules treat a computed name as unknown, never try to evaluate it.
    """
    if isinstance(node, ast.Constant):
        if isinstance(node.value, str):
            return node.value
        if isinstance(node.value, bytes):
            try:
                return node.value.decode("utf-8")
            except UnicodeDecodeError:
                return None
    return None


class Scope:
    """Names, aliases and parents of one program (see the module docstring)."""

    def __init__(self, tree: ast.AST) -> None:
        # ast.walk is iterative, so deeply nested (but parseable) code cannot crash it.
        self.nodes: list[ast.AST] = list(ast.walk(tree))
        self.parents: dict[int, ast.AST] = {}
        for node in self.nodes:
            for child in ast.iter_child_nodes(node):
                self.parents[id(child)] = node
        self.bound: frozenset[str] = _bound_names(self.nodes)
        #: name -> the dotted path it stands for (modules and imported members)
        self.aliases: dict[str, str] = {}
        #: names bound by ``import x`` (certainly a module)
        self.module_names: set[str] = set()
        #: modules imported with ``from m import *``: their public names are unbound names
        self.star_modules: list[str] = []
        self._collect_imports()
        self._collect_assigned_aliases()

    # -- building ------------------------------------------------------------------

    def _collect_imports(self) -> None:
        for node in self.nodes:
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.asname:
                        self.aliases[alias.asname] = canonical(alias.name)
                        self.module_names.add(alias.asname)
                    else:
                        top = alias.name.split(".")[0]
                        self.aliases[top] = canonical(top)
                        self.module_names.add(top)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                for alias in node.names:
                    if alias.name == "*":
                        self.star_modules.append(canonical(node.module))
                    else:
                        self.aliases[alias.asname or alias.name] = canonical(f"{node.module}.{alias.name}")

    def _collect_assigned_aliases(self) -> None:
        # m = pathlib.os; p = __import__('os'): the name then stands for the module.
        # Repeated so that chains of assignments (a = os; b = a) resolve too.
        for _ in range(3):
            changed = False
            for node in self.nodes:
                if isinstance(node, ast.Assign) and len(node.targets) == 1:
                    target, value = node.targets[0], node.value
                elif isinstance(node, (ast.AnnAssign, ast.NamedExpr)) and node.value is not None:
                    target, value = node.target, node.value
                else:
                    continue
                if not isinstance(target, ast.Name):
                    continue
                path = self.resolve(value)
                if path and self.aliases.get(target.id) != path:
                    self.aliases[target.id] = path
                    changed = True
            if not changed:
                return

    # -- queries -------------------------------------------------------------------

    def parent(self, node: ast.AST) -> ast.AST | None:
        return self.parents.get(id(node))

    def is_call_target(self, node: ast.AST) -> bool:
        parent = self.parent(node)
        return isinstance(parent, ast.Call) and parent.func is node

    def builtin_name(self, node: ast.AST) -> str | None:
        """``eval`` for ``eval`` (not rebound by the program) or ``builtins.eval``."""
        if isinstance(node, ast.Name) and node.id not in self.bound and node.id not in self.aliases:
            return node.id
        path = self.resolve(node)
        if path and path.startswith("builtins.") and path.count(".") == 1:
            return path.split(".", 1)[1]
        return None

    def resolve(self, node: ast.AST) -> str | None:
        """The canonical dotted path ``node`` reaches, or None when it is not a module path."""
        parts: list[str] = []
        while True:
            if isinstance(node, ast.NamedExpr):  # (m := pathlib.os).system
                node = node.value
            elif isinstance(node, ast.Attribute):
                parts.append(node.attr)
                node = node.value
            elif isinstance(node, ast.Call) and self._literal_getattr(node):
                parts.append(literal_text(node.args[1]) or "")
                node = node.args[0]
            else:
                break
        parts.reverse()
        root: str | None = None
        if isinstance(node, ast.Name):
            root = self.aliases.get(node.id)
        elif isinstance(node, ast.Call):
            root = self._imported_by_call(node)
        if root is None:
            # a chain through an attribute named after a sensitive module reaches that
            # module, whatever it starts from (self.os.system is os.system)
            if not any(part in REACH_NAMES for part in parts):
                return None
            root = "?"
        return canonical(".".join([root, *parts]))

    def is_own_object(self, node: ast.AST) -> bool:
        """``self``, ``obj``, ``self.config``: rooted at a name the program binds, which
        stands for no module, through ordinary (non-dunder) attributes."""
        while isinstance(node, ast.Attribute):
            if node.attr.startswith("__") or node.attr in REACH_NAMES:
                return False
            node = node.value
        return isinstance(node, ast.Name) and node.id in self.bound and node.id not in self.aliases

    def _literal_getattr(self, node: ast.Call) -> bool:
        return (
            self.builtin_name(node.func) == "getattr"
            and len(node.args) >= 2
            and literal_text(node.args[1]) is not None
        )

    def _imported_by_call(self, node: ast.Call) -> str | None:
        func = node.func
        name = self.builtin_name(func)
        path = "builtins.__import__" if name == "__import__" else self.resolve(func)
        if path in _IMPORT_FUNCTIONS and node.args:
            module = literal_text(node.args[0])
            if module and not module.startswith("."):
                if path == "builtins.__import__":
                    return canonical(module.split(".")[0])  # __import__('a.b') returns a
                return canonical(module)
        return None


def canonical(path: str) -> str:
    """The module a dotted path really reaches: ``posix.system`` -> ``os.system``,
    ``pathlib.os.popen`` -> ``os.popen``, ``logging.os`` -> ``os``: everything up to the
    last name of :data:`REACH_NAMES` is replaced by the module it stands for."""
    parts = path.split(".")
    for index in range(len(parts) - 1, -1, -1):
        if parts[index] in REACH_NAMES:
            return ".".join([REACH_NAMES[parts[index]], *parts[index + 1 :]])
    return path


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
