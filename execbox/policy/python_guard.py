"""The ``guard`` rules for Python: reject only what reaches past ordinary computation.

Four families, each a rule name in the findings:

* ``process``: starting or signalling processes: ``subprocess``, ``pty``,
  ``multiprocessing``, ``os.system``, ``os.popen``, ``os.exec*``, ``os.spawn*``,
  ``os.fork``, ``os.kill``, ``asyncio.create_subprocess_*``, ``ProcessPoolExecutor``...
* ``native-code``: loading machine code: ``ctypes``, ``cffi``, ``numpy.ctypeslib``,
  ``importlib.machinery`` and the file loaders of ``importlib.util``, ``imp``.
* ``dynamic-code``: running code that is data: ``eval``/``exec``/``compile`` of anything
  but a string literal (a literal is inspected itself, with these rules),
  ``__import__``/``importlib.import_module`` of a computed name, ``code``, ``runpy``,
  ``pdb``, unpickling (``pickle.loads`` of a literal runs ``os.system``), ``types.CodeType``.
* ``internals``: climbing to the interpreter: ``sys._getframe`` and ``sys._*``,
  ``sys.modules``, ``gc.get_objects``, ``inspect.currentframe``, ``__subclasses__``,
  ``__globals__``, ``__code__``, ``__builtins__``, frames, a module's ``__dict__``,
  ``globals()``, ``vars()`` of a module.

And two rules that keep the others from being walked around:

* ``computed-name``: ``getattr``/``setattr``/``delattr`` with a computed name, except on
  the program's own objects (``getattr(self, field)``); ``getattr`` passed as a value.
* ``module-value``: a module passed around as a value (``f(os)``, ``[pathlib]``), whose
  members the rules could no longer follow; assigning it to a name (``m = os``) is fine.

Everything is resolved through :class:`~execbox.policy.python_scope.Scope`: aliases
(``import os as o``, ``from os import system as s``, ``m = pathlib``), chains through other
modules (``pathlib.os.popen`` is ``os.popen``) and literal ``getattr``. Everyday code passes:
``import os``, ``os.path``, ``os.makedirs``, ``os.environ``, ``os.listdir``, ``open()``,
``getattr(obj, 'name')``, ``sys.version``, ``json``, ``pathlib``, comments and strings.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable

from execbox.policy.findings import Hit
from execbox.policy.python_scope import REACH_NAMES, Scope, canonical, literal_text

__all__ = [
    "GUARD_ATTRIBUTES",
    "GUARD_PATHS",
    "SOURCE_FUNCTIONS",
    "check_source_function",
    "guard_hits",
    "guard_path_rule",
]

#: Dotted paths (a module, or a member; ``*`` ends a name prefix) and the rule that
#: rejects them and everything under them.
GUARD_PATHS: dict[str, str] = {
    **dict.fromkeys(
        (
            "subprocess", "_posixsubprocess", "pty", "multiprocessing", "_winapi",
            "concurrent.futures.process", "concurrent.futures.ProcessPoolExecutor",
            "os.system", "os.popen", "os.fork", "os.forkpty", "os.exec*", "os.spawn*",
            "os.posix_spawn*", "os.kill", "os.killpg", "os.register_at_fork", "os.startfile",
            "asyncio.create_subprocess_*", "pipes", "webbrowser",
        ),
        "process",
    ),
    **dict.fromkeys(
        (
            "ctypes", "cffi", "_cffi_backend", "numpy.ctypeslib", "imp", "_imp", "zipimport",
            "importlib.machinery", "importlib._bootstrap*", "importlib.util.spec_from_file_location",
            "importlib.util.spec_from_loader", "importlib.util.module_from_spec",
            "sys.setdlopenflags", "os.add_dll_directory",
        ),
        "native-code",
    ),
    **dict.fromkeys(
        (
            "code", "codeop", "runpy", "pdb", "_pickle", "pickle.load", "pickle.loads",
            "pickle.Unpickler", "marshal.load", "marshal.loads", "types.CodeType",
        ),
        "dynamic-code",
    ),
    **dict.fromkeys(
        (
            "sys._*", "sys.modules", "sys.meta_path", "sys.path_hooks", "sys.path_importer_cache",
            "sys.settrace", "sys.setprofile", "sys.call_tracing", "gc.get_objects",
            "gc.get_referrers", "gc.get_referents", "inspect.currentframe", "inspect.stack",
            "inspect.trace", "inspect.getouterframes", "inspect.getinnerframes",
            "traceback.walk_stack", "threading.settrace", "threading.setprofile", "builtins.__dict__",
        ),
        "internals",
    ),
}  # fmt: skip

#: Attribute names rejected on any object, with their rule.
GUARD_ATTRIBUTES: dict[str, str] = {
    **dict.fromkeys(
        (
            "__subclasses__", "__globals__", "__builtins__", "__code__", "__closure__",
            "__self__", "__loader__", "__spec__", "__import__", "__getattribute__",
            "tb_frame", "gi_frame", "gi_code", "cr_frame", "cr_code", "ag_frame", "ag_code",
            "f_globals", "f_locals", "f_builtins", "f_back", "f_code",
        ),
        "internals",
    ),
    **dict.fromkeys(
        (
            "create_subprocess_exec", "create_subprocess_shell", "subprocess_exec",
            "subprocess_shell", "ProcessPoolExecutor",
        ),
        "process",
    ),
    "ctypeslib": "native-code",
    "CodeType": "dynamic-code",
}  # fmt: skip

_CODE_BUILTINS = frozenset({"eval", "exec", "compile"})
_ATTR_BUILTINS = frozenset({"getattr", "setattr", "delattr"})
_NAMESPACE_BUILTINS = frozenset({"globals", "locals", "vars", "breakpoint"})
_IMPORT_PATHS = frozenset({"importlib.import_module", "importlib.__import__"})
#: functions that run a string argument as Python source: (positions, keyword names)
SOURCE_FUNCTIONS: dict[str, tuple[int, tuple[str, ...]]] = {
    "timeit.timeit": (2, ("stmt", "setup")), "timeit.repeat": (2, ("stmt", "setup")),
    "timeit.Timer": (2, ("stmt", "setup")), "cProfile.run": (1, ("statement",)),
    "cProfile.runctx": (1, ("statement",)), "profile.run": (1, ("statement",)),
    "profile.runctx": (1, ("statement",)),
}  # fmt: skip
_SENSITIVE_MODULES = frozenset(REACH_NAMES.values())
#: how many literal sources inside literal sources (exec("exec('...')")) are inspected
_MAX_NESTING = 3


def _compile_paths() -> list[tuple[re.Pattern[str], str]]:
    compiled = []
    for pattern, rule in GUARD_PATHS.items():
        body = re.escape(pattern).replace(r"\*", r"[^.]*")
        compiled.append((re.compile(rf"{body}(?:\..*)?"), rule))
    return compiled


_PATH_RULES = _compile_paths()

Reinspect = Callable[[str, int], list[Hit]]


def guard_path_rule(path: str) -> str | None:
    """The rule that rejects the canonical dotted ``path`` under guard, or None."""
    path = canonical(path)
    for pattern, rule in _PATH_RULES:
        if pattern.fullmatch(path):
            return rule
    return None


def guard_hits(scope: Scope, depth: int, reinspect: Reinspect) -> list[Hit]:
    """Every guard finding of one program. ``reinspect(source, depth)`` inspects a
    literal source given to ``exec``/``eval``/``compile`` with these same rules."""
    hits: list[Hit] = []
    for node in scope.nodes:
        if isinstance(node, ast.Import):
            for alias in node.names:
                hits.extend(_path_hit(alias, alias.name, "Import"))
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            hits.extend(_path_hit(node, node.module, "Import"))
            for alias in node.names:
                if alias.name != "*":
                    hits.extend(_path_hit(alias, f"{node.module}.{alias.name}", "Import"))
        elif isinstance(node, ast.Call):
            hits.extend(_check_call(scope, node, depth, reinspect))
        elif isinstance(node, ast.Attribute):
            hits.extend(_check_attribute(scope, node))
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
            hits.extend(_check_name(scope, node))
    return hits


def _path_hit(node: ast.expr | ast.stmt | ast.alias, path: str, verb: str) -> list[Hit]:
    rule = guard_path_rule(path)
    if rule is None:
        return []
    return [(node.lineno, node.col_offset, f"{verb} of '{canonical(path)}' is not allowed", rule)]


def _is_chain_end(scope: Scope, node: ast.AST) -> bool:
    """True unless ``node`` is the object of a longer chain (``os`` in ``os.path``)."""
    parent = scope.parent(node)
    if isinstance(parent, ast.Attribute) and parent.value is node:
        return False
    if isinstance(parent, ast.Call) and parent.args and parent.args[0] is node:
        if scope.builtin_name(parent.func) in ("getattr", "hasattr") and len(parent.args) >= 2:
            return literal_text(parent.args[1]) is None  # getattr(os, 'x') is os.x
    return True


def _check_attribute(scope: Scope, node: ast.Attribute) -> list[Hit]:
    where = (node.lineno, node.col_offset)
    hits: list[Hit] = []
    rule = GUARD_ATTRIBUTES.get(node.attr)
    if rule:
        hits.append((*where, f"Access to '{node.attr}' is not allowed", rule))
    elif node.attr == "__dict__" and not scope.is_own_object(node.value):
        hits.append((*where, "Access to '__dict__' of a module or class is not allowed", "internals"))
    if not hits and _is_chain_end(scope, node):
        hits.extend(_check_reached(scope, node))
    return hits


def _check_name(scope: Scope, node: ast.Name) -> list[Hit]:
    hits: list[Hit] = []
    name = scope.builtin_name(node)
    if name and not scope.is_call_target(node):
        if name in _CODE_BUILTINS or name == "__import__":
            hits.append((node.lineno, node.col_offset, f"Use of '{name}' as a value is not allowed", "dynamic-code"))
        elif name in _ATTR_BUILTINS:
            hits.append((node.lineno, node.col_offset, f"Use of '{name}' as a value is not allowed", "computed-name"))
        elif name in _NAMESPACE_BUILTINS:
            hits.append((node.lineno, node.col_offset, f"Use of '{name}' is not allowed", "internals"))
    if node.id in scope.aliases and _is_chain_end(scope, node):
        hits.extend(_check_reached(scope, node))
    elif node.id not in scope.bound and node.id not in scope.aliases:
        for module in scope.star_modules:  # from os import *; system('id')
            hits.extend(_path_hit(node, f"{module}.{node.id}", "Use"))
    return hits


def _check_reached(scope: Scope, node: ast.expr) -> list[Hit]:
    """The path a maximal name or chain reaches, and whether it escapes as a value."""
    path = scope.resolve(node)
    if path is None:
        return []
    rule = guard_path_rule(path)
    if rule:
        return [(node.lineno, node.col_offset, f"Use of '{path}' is not allowed", rule)]
    is_module = path in _SENSITIVE_MODULES or (isinstance(node, ast.Name) and node.id in scope.module_names)
    if is_module and _escapes_as_value(scope, node):
        return [(node.lineno, node.col_offset, f"Module '{path}' used as a value is not allowed", "module-value")]
    return []


def _escapes_as_value(scope: Scope, node: ast.expr) -> bool:
    parent = scope.parent(node)
    if isinstance(parent, (ast.Assign, ast.AnnAssign, ast.NamedExpr)) and parent.value is node:
        targets = parent.targets if isinstance(parent, ast.Assign) else [parent.target]
        return not all(isinstance(target, ast.Name) for target in targets)  # m = os is tracked
    if isinstance(parent, ast.Call) and parent.func is node:
        return False
    if isinstance(parent, ast.Call) and parent.args and parent.args[0] is node:
        return scope.builtin_name(parent.func) not in ("getattr", "hasattr", "setattr", "delattr")
    return not isinstance(parent, ast.Expr)


def _check_call(scope: Scope, node: ast.Call, depth: int, reinspect: Reinspect) -> list[Hit]:
    where = (node.lineno, node.col_offset)
    name = scope.builtin_name(node.func)
    path = scope.resolve(node.func)
    if name in _CODE_BUILTINS:
        return _check_source(scope, node, name, depth, reinspect)
    if name == "__import__" or path in _IMPORT_PATHS:
        label = name or (path or "").rsplit(".", 1)[-1]
        module = literal_text(node.args[0]) if node.args else None
        if module is None:
            return [(*where, f"'{label}' with a computed name is not allowed", "dynamic-code")]
        return _path_hit(node, module, "Import")
    if name in _ATTR_BUILTINS and len(node.args) >= 2:
        attr = literal_text(node.args[1])
        if attr is None:
            if scope.is_own_object(node.args[0]):
                return []
            return [(*where, f"'{name}' with a computed name is not allowed", "computed-name")]
        rule = GUARD_ATTRIBUTES.get(attr)
        if rule:
            return [(*where, f"Access to '{attr}' is not allowed", rule)]
        if name == "getattr":  # getattr(x, 'lit') is x.lit
            return _check_reached(scope, node) if _is_chain_end(scope, node) else []
        base = scope.resolve(node.args[0])
        return _path_hit(node, f"{base}.{attr}", "Use") if base else []
    if path in SOURCE_FUNCTIONS:
        return check_source_function(scope, node, path, depth, reinspect)
    if name in ("globals", "locals", "breakpoint") or (name == "vars" and not node.args):
        return [(*where, f"Call of '{name}' is not allowed", "internals")]
    if name == "vars" and not scope.is_own_object(node.args[0]):
        return [(*where, "Call of 'vars' on a module or class is not allowed", "internals")]
    return []


def check_source_function(scope: Scope, node: ast.Call, path: str, depth: int, reinspect: Reinspect) -> list[Hit]:
    """``timeit.timeit(stmt)``, ``cProfile.run(statement)``: a string argument is source.

    A literal is inspected like ``exec``'s, a lambda or a ``def``'d function is called,
    anything else may be a computed string and is rejected. Used by block too."""
    positions, keywords = SOURCE_FUNCTIONS[path]
    label = path
    statements = list(node.args[:positions]) + [kw.value for kw in node.keywords if kw.arg in keywords]
    hits: list[Hit] = []
    for statement in statements:
        source = literal_text(statement)
        if source is not None:
            fake = ast.copy_location(ast.Call(func=ast.Name("exec"), args=[statement], keywords=[]), node)
            hits.extend(_check_source(scope, fake, label, depth, reinspect))
        elif not isinstance(statement, ast.Lambda) and not (
            isinstance(statement, ast.Name) and _is_only_a_function(scope, statement.id)
        ):
            hits.append((node.lineno, node.col_offset, f"'{label}' of a computed string is not allowed", "dynamic-code"))
    return hits


def _is_only_a_function(scope: Scope, name: str) -> bool:
    """Whether every binding of ``name`` in the program is a ``def`` (or ``name = lambda``)."""
    found = False
    for node in scope.nodes:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            found = True
        elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            if not isinstance(node.value, ast.Lambda):
                return False
            found = True
        elif isinstance(node, ast.Name) and node.id == name and not isinstance(node.ctx, ast.Load):
            parent = scope.parent(node)
            if not (isinstance(parent, ast.Assign) and isinstance(parent.value, ast.Lambda)):
                return False
        elif isinstance(node, ast.arg) and node.arg == name or isinstance(node, ast.alias) and (node.asname or node.name) == name:
            return False
    return found


def _check_source(scope: Scope, node: ast.Call, name: str, depth: int, reinspect: Reinspect) -> list[Hit]:
    where = (node.lineno, node.col_offset)
    source_node = node.args[0] if node.args else next(
        (kw.value for kw in node.keywords if kw.arg in ("source", "object", "expression")), None
    )
    if source_node is None:
        return []
    if isinstance(source_node, ast.Call) and scope.builtin_name(source_node.func) == "compile":
        return []  # exec(compile(...)): the compile call is checked on its own
    source = literal_text(source_node)
    if source is None:
        return [(*where, f"'{name}' of a computed string is not allowed", "dynamic-code")]
    if depth >= _MAX_NESTING:
        return [(*where, f"'{name}' nested too deeply to inspect", "dynamic-code")]
    return [
        (*where, f"{message} (in the source given to '{name}')", rule)
        for _line, _col, message, rule in reinspect(source, depth + 1)
    ]
