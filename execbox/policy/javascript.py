"""Token-based inspection of JavaScript / Node.js code, under the ``block`` or ``guard`` rules.

The code is tokenized first (:mod:`execbox.policy.javascript_tokens`), so comments and the
text of strings never match: ``// never eval input`` passes, and so does
``console.log("uses child_process")``. Member access by a literal key counts as the
member (``process['binding']`` is ``process.binding``), and escapes are decoded
(``require('\\x66s')`` is ``require('fs')``). Each finding is reported at the 1-based line
of its first token.

Both modes reject:

* **Loading a module** of the mode's list, or a subpath of one (``fs/promises``), with or
  without the ``node:`` prefix, via ``require(...)``, ``import(...)``, ``import ... from``,
  ``import '...'`` or ``export ... from``; ``block``: :data:`BLOCKED_MODULES`,
  ``guard``: :data:`GUARD_MODULES` (``fs``, ``path``, ``os``, ``http`` pass). A native
  addon (a specifier ending in ``.node``) is rejected in both (rule ``native-code``).
* **A computed module name**: ``require(name)``, ``require('child' + '_process')``,
  ``import(`${x}`)``, ``require`` passed around as a value or through
  ``require.call``/``apply``/``bind`` (rule ``computed-name``).
* **Dangerous ``process`` members** in :data:`BLOCKED_PROCESS_MEMBERS` (``process.binding``,
  ``process.dlopen``, ``process.mainModule``, ...), also destructured
  (``const {binding} = process``), a computed member (``process[k]``) and ``process``
  passed around as a value; a computed member of the global object (``globalThis[k]``).
* **The Function constructor reached through ``constructor``**: a function's
  ``.constructor`` other than a member of it (``x.constructor.name``) or a comparison
  (``x.constructor === A``), as in ``(() => {}).constructor('code')`` or
  ``const AF = ....constructor``, and ``{ constructor: F }`` destructuring; and the module
  loader's internals (``module.constructor``, ``._load``, ``._compile``).

``block`` also rejects every ``eval`` and every use of ``Function`` but
``instanceof Function``, ``typeof Function`` and its members (``Function.prototype``)
(rule ``builtin``). ``guard`` rejects them only with a computed argument, used as a
value, through ``.call``/``.apply``/``.bind`` or as a template tag (rule
``dynamic-code``); a string literal given to them is inspected itself.

Words are matched as whole identifiers: ``myeval(``, ``evaluate(``, ``isFunction(``,
``AsyncFunctionRunner(`` and ``$eval`` are not flagged. This is a first line of defence,
not the security boundary.
"""

from __future__ import annotations

from execbox.policy.findings import Finding, Hit, collect_findings
from execbox.policy.javascript_tokens import Token, tokenize
from execbox.settings import CodeCheckMode

__all__ = ["BLOCKED_MODULES", "BLOCKED_PROCESS_MEMBERS", "GUARD_MODULES", "inspect_javascript"]

#: Node core modules whose loading ``block`` rejects (also any ``name/subpath``).
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

#: Node core modules whose loading ``guard`` rejects, with the rule that rejects them.
GUARD_MODULES: dict[str, str] = {
    "child_process": "process",
    "cluster": "process",
    "worker_threads": "dynamic-code",  # new Worker(source, {eval: true})
    "vm": "dynamic-code",
    "repl": "dynamic-code",
    "inspector": "internals",
    "v8": "internals",
    "module": "internals",
    "wasi": "native-code",
}

#: Members of the global ``process`` object whose access is rejected, with their rule.
BLOCKED_PROCESS_MEMBERS: dict[str, str] = {
    "_linkedBinding": "native-code",
    "binding": "native-code",
    "dlopen": "native-code",
    "kill": "process",
    "mainModule": "internals",
    "setegid": "process",
    "seteuid": "process",
    "setgid": "process",
    "setgroups": "process",
    "setuid": "process",
}

_GLOBAL_OBJECTS = frozenset({"globalThis", "global", "window", "self"})
_LOADER_INTERNALS = {"_load": "internals", "_compile": "dynamic-code", "_resolveFilename": "internals"}
_LITERALS = frozenset({"string", "template"})
#: tokens after which a name is used as a value (an argument, an initialiser, ...)
_VALUE_CONTEXT = frozenset({"=", "(", ",", ":", "?", "||", "&&", "??", "[", "{", "...", "=>", "return"})
_TEMPLATES = frozenset({"template", "template-part"})
#: what may follow ``x.constructor`` harmlessly: a comparison (``x.constructor === A``)
_CONSTRUCTOR_COMPARISONS = frozenset({"===", "==", "!==", "!="})
_CALL_FORWARDERS = frozenset({"call", "apply", "bind"})
_MAX_NESTING = 3


def inspect_javascript(code: str, mode: CodeCheckMode = CodeCheckMode.BLOCK) -> list[Finding]:
    """Return the constructs in ``code`` that ``mode``'s rules reject.

    ``guard`` applies the guard rules, ``block`` and ``warn`` the block rules, ``off``
    finds nothing. Findings are sorted by line and deduplicated.
    """
    if mode is CodeCheckMode.OFF:
        return []
    return collect_findings(_Inspector(tokenize(code), mode, depth=0).run())


class _Inspector:
    def __init__(self, tokens: list[Token], mode: CodeCheckMode, depth: int) -> None:
        self.tokens = _members_by_literal_key(tokens)
        self.guard = mode is CodeCheckMode.GUARD
        self.mode = mode
        self.depth = depth
        self.hits: list[Hit] = []

    # -- token helpers ---------------------------------------------------------------

    def at(self, index: int) -> Token | None:
        return self.tokens[index] if 0 <= index < len(self.tokens) else None

    def is_punct(self, index: int, *values: str) -> bool:
        token = self.at(index)
        return token is not None and token.kind == "punct" and token.value in values

    def is_name(self, index: int, *values: str) -> bool:
        token = self.at(index)
        return token is not None and token.kind == "name" and (not values or token.value in values)

    def member_after(self, index: int) -> str | None:
        """The member name accessed right after token ``index`` (``.x``, ``?.x``)."""
        if self.is_punct(index + 1, ".", "?.") and self.is_name(index + 2):
            return self.tokens[index + 2].value
        return None

    def call_after(self, index: int) -> int | None:
        """The index of the ``(`` calling token ``index`` (``f(``, ``f?.(``), or None."""
        if self.is_punct(index + 1, "("):
            return index + 1
        if self.is_punct(index + 1, "?.") and self.is_punct(index + 2, "("):
            return index + 2
        return None

    def tagged_after(self, index: int) -> bool:
        """Whether token ``index`` is the tag of a tagged template (``f`...```)."""
        following = self.at(index + 1)
        return following is not None and following.kind in _TEMPLATES

    def computed_member_after(self, index: int) -> bool:
        return self.is_punct(index + 1, "[") or (self.is_punct(index + 1, "?.") and self.is_punct(index + 2, "["))

    def arguments(self, open_index: int) -> list[list[Token]] | None:
        """The arguments of the call whose ``(`` is at ``open_index``, split at top-level commas."""
        if not self.is_punct(open_index, "("):
            return None
        depth, current, result = 0, [], []
        for token in self.tokens[open_index + 1 :]:
            if token.kind == "punct" and token.value in "([{":
                depth += 1
            elif token.kind == "punct" and token.value in ")]}":
                if depth == 0:
                    if current:
                        result.append(current)
                    return result
                depth -= 1
            if depth == 0 and token.kind == "punct" and token.value == ",":
                result.append(current)
                current = []
            else:
                current.append(token)
        return result  # unclosed: Node reports the SyntaxError

    @staticmethod
    def literal(argument: list[Token]) -> str | None:
        return argument[0].value if len(argument) == 1 and argument[0].kind in _LITERALS else None

    def hit(self, token: Token, message: str, rule: str) -> None:
        self.hits.append((token.line, 0, message, rule))

    # -- rules ---------------------------------------------------------------------------

    def run(self) -> list[Hit]:
        for index, token in enumerate(self.tokens):
            if token.kind == "string" and self.is_name(index - 1, "import", "from"):
                keyword = self._statement_start(index - 1)
                self._check_specifier(self.tokens[keyword], token.value)
            elif token.kind != "name":
                continue
            elif token.value in ("require", "import"):
                self._check_loader(index)
            elif token.value == "eval":
                self._check_eval(index)
            elif token.value == "Function":
                self._check_function(index)
            elif token.value == "process":
                self._check_process(index)
            elif token.value in _GLOBAL_OBJECTS and self.computed_member_after(index):
                self.hit(token, f"Computed access to '{token.value}' is not allowed", "computed-name")
            elif token.value == "constructor" and self.is_punct(index - 1, ".", "?."):
                self._check_constructor(index)
            elif token.value == "constructor":
                self._check_destructured_constructor(index)
            elif token.value in _LOADER_INTERNALS and self.is_punct(index - 1, ".", "?."):
                self.hit(token, f"Access to '{token.value}' is not allowed", _LOADER_INTERNALS[token.value])
        return self.hits

    def _statement_start(self, index: int) -> int:
        """The ``import``/``export`` owning the ``from`` at ``index`` (its clause holds only
        names, braces, commas and ``*``), else ``index`` itself."""
        for back in range(index - 1, max(-1, index - 512), -1):
            token = self.tokens[back]
            if token.kind == "name" and token.value in ("import", "export"):
                return back
            if not (token.kind == "name" or (token.kind == "punct" and token.value in "{},*")):
                break
        return index

    def _check_specifier(self, token: Token, spec: str) -> None:
        name = spec.removeprefix("node:")
        base = name.split("/")[0]
        if name.endswith(".node"):
            self.hit(token, f"Import of '{name}' (a native addon) is not allowed", "native-code")
        elif self.guard and base in GUARD_MODULES:
            self.hit(token, f"Import of '{name}' is not allowed", GUARD_MODULES[base])
        elif not self.guard and base in BLOCKED_MODULES:
            self.hit(token, f"Import of '{name}' is not allowed", "import")

    def _check_loader(self, index: int) -> None:
        token = self.tokens[index]
        call = self.call_after(index)
        arguments = self.arguments(call) if call is not None else None
        if self.tagged_after(index):
            self.hit(token, f"{token.value}`...` with a template is not allowed", "computed-name")
        elif arguments is not None:
            spec = self.literal(arguments[0]) if len(arguments) >= 1 else None
            if token.value == "import" and self.is_punct(index - 1, "."):
                return
            if spec is None:
                self.hit(token, f"{token.value}() with a computed module name is not allowed", "computed-name")
            else:
                self._check_specifier(token, spec)
        elif token.value == "require":
            member = self.member_after(index)
            if member in _CALL_FORWARDERS or (
                member is None and not self.computed_member_after(index) and self._used_as_value(index)
            ):
                self.hit(token, "Use of 'require' as a value is not allowed", "computed-name")

    def _used_as_value(self, index: int) -> bool:
        previous = self.at(index - 1)
        return previous is not None and previous.value in _VALUE_CONTEXT and previous.kind in ("punct", "name")

    def _check_eval(self, index: int) -> None:
        token = self.tokens[index]
        if not self.guard:
            self.hit(token, "Use of 'eval' is not allowed", "builtin")
            return
        call = self.call_after(index)
        arguments = self.arguments(call) if call is not None else None
        if arguments is None:
            self.hit(token, "Use of 'eval' as a value is not allowed", "dynamic-code")
        elif arguments:
            self._check_sources(token, "eval", arguments[:1])

    def _check_function(self, index: int) -> None:
        token = self.tokens[index]
        member = self.member_after(index)
        if self.is_name(index - 1, "instanceof", "typeof") or (member and member not in _CALL_FORWARDERS):
            return  # x instanceof Function, Function.prototype, Function.name
        call = self.call_after(index)
        if not self.guard:
            self.hit(token, "Use of 'Function' is not allowed", "builtin")
        elif member or self.tagged_after(index):  # Function.call(null, src), Function`src`
            self.hit(token, f"Use of 'Function' through {member or 'a template'} is not allowed", "dynamic-code")
        elif call is not None:
            self._check_sources(token, "Function", self.arguments(call) or [])
        elif not self.is_name(index - 1, "new"):  # new Function; alone makes an empty function
            self.hit(token, "Use of 'Function' as a value is not allowed", "dynamic-code")

    def _check_sources(self, token: Token, name: str, arguments: list[list[Token]]) -> None:
        sources = [self.literal(argument) for argument in arguments]
        if any(source is None for source in sources):
            self.hit(token, f"'{name}' of a computed string is not allowed", "dynamic-code")
            return
        if self.depth >= _MAX_NESTING:
            self.hit(token, f"'{name}' nested too deeply to inspect", "dynamic-code")
            return
        inner = _Inspector(tokenize("\n".join(s or "" for s in sources)), self.mode, self.depth + 1).run()
        for _line, _column, message, rule in inner:
            self.hit(token, f"{message} (in the source given to '{name}')", rule)

    def _check_process(self, index: int) -> None:
        token = self.tokens[index]
        member = self.member_after(index)
        if member in BLOCKED_PROCESS_MEMBERS:
            self.hit(token, f"Access to 'process.{member}' is not allowed", BLOCKED_PROCESS_MEMBERS[member])
        elif member is None and self.computed_member_after(index):
            self.hit(token, "Computed access to 'process' members is not allowed", "computed-name")
        elif member is None and self.is_punct(index - 1, "=") and self.is_punct(index - 2, "}"):
            for name in self._destructured(index - 2):
                if name in BLOCKED_PROCESS_MEMBERS:
                    self.hit(token, f"Access to 'process.{name}' is not allowed", BLOCKED_PROCESS_MEMBERS[name])
        elif member is None and self._used_as_value(index) and not self.is_punct(index - 1, "."):
            self.hit(token, "Use of 'process' as a value is not allowed", "computed-name")

    def _destructured(self, close_index: int) -> list[str]:
        depth = 0
        for back in range(close_index, -1, -1):
            token = self.tokens[back]
            if token.kind == "punct" and token.value == "}":
                depth += 1
            elif token.kind == "punct" and token.value == "{":
                depth -= 1
                if depth == 0:
                    return [t.value for t in self.tokens[back:close_index] if t.kind in ("name", "string")]
        return []

    def _check_constructor(self, index: int) -> None:
        """``f.constructor`` of a function is the Function constructor in disguise:
        only ``x.constructor.name`` (a member) and comparisons pass."""
        token = self.tokens[index]
        member = self.member_after(index)
        following = self.at(index + 1)
        if self.is_name(index - 2, "module"):
            self.hit(token, "Access to 'module.constructor' is not allowed", "internals")
        elif member and member not in _CALL_FORWARDERS and member != "constructor":
            return
        elif following is not None and following.kind == "punct" and following.value in _CONSTRUCTOR_COMPARISONS:
            return
        else:
            self.hit(token, "Use of a function's 'constructor' is not allowed", "dynamic-code")

    def _check_destructured_constructor(self, index: int) -> None:
        """``const { constructor: F } = fn`` takes the Function constructor by name."""
        if self.is_punct(index - 1, "{", ",") and self.is_punct(index + 1, ":", ",", "}"):
            self.hit(self.tokens[index], "Use of a function's 'constructor' is not allowed", "dynamic-code")


def _members_by_literal_key(tokens: list[Token]) -> list[Token]:
    """``x['name']`` -> ``x.name``: a member accessed by a literal key is that member."""
    result: list[Token] = []
    index = 0
    while index < len(tokens):
        token = tokens[index]
        if (
            token.kind == "punct" and token.value == "["
            and index + 2 < len(tokens)
            and tokens[index + 1].kind in _LITERALS
            and tokens[index + 2].kind == "punct" and tokens[index + 2].value == "]"
            and result and _ends_expression(result[-1])
        ):  # fmt: skip
            key = tokens[index + 1].value
            if key.replace("$", "_").isidentifier():
                if not (result[-1].kind == "punct" and result[-1].value == "?."):
                    result.append(Token("punct", ".", token.line))
                result.append(Token("name", key, tokens[index + 1].line))
                index += 3
                continue
        result.append(token)
        index += 1
    return result


def _ends_expression(token: Token) -> bool:
    """Whether a ``[`` after ``token`` is a member access (not an array literal)."""
    if token.kind == "name":
        return token.value not in ("return", "typeof", "in", "of", "new", "delete", "void", "throw", "case", "yield", "await")
    return token.kind in ("string", "template", "template-part", "regex") or (
        token.kind == "punct" and token.value in (")", "]", "?.")
    )
