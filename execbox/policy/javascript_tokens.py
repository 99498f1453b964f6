"""A small JavaScript tokenizer: enough of the lexical grammar to tell code from text.

The JavaScript rules match on tokens, so a comment or a string that mentions ``eval`` or
``child_process`` is text, not code. Comments are dropped; string and template literals
become one token each with their *decoded* value (``'\\x66s'`` is ``fs``, so escapes are
no way around a rule); a template with substitutions becomes ``template-part`` tokens
around the tokens of its ``${...}`` code (nested templates and braces included);
identifiers are decoded too (``\\u0065val`` is ``eval``). A ``/`` starts a regular
expression literal where an expression may start (after an operator, ``(``, ``,``, ``=``,
a keyword such as ``return``, the ``)`` of ``if (...)``/``while (...)``/``for (...)``, or the
``}`` of a block), else it is division: the usual heuristic. Getting this right matters
for safety, not only for comfort: a regex read as division would make ``/'/`` look like
the start of a string and hide the code after it.

Hand-written because no maintained Python JavaScript parser fits: ``esprima`` (4.0.1, 2018)
stops at ES2017 and ``pyjsparser`` (2.7.1, 2019) at ES5, so both fail on optional chaining,
``??``, class fields or top-level ``await`` that user code has; tree-sitter's JavaScript
grammar would parse it but is a compiled extension and a new dependency for what a
tokenizer of this size does. Invalid code does not raise: it yields the tokens it can,
and the program then fails with Node's own ``SyntaxError``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["Token", "tokenize"]


@dataclass(frozen=True, slots=True)
class Token:
    """One token. ``kind`` is ``name``, ``string``, ``template`` (no substitutions),
    ``template-part``, ``number``, ``regex`` or ``punct``; ``line`` is 1-based."""

    kind: str
    value: str
    line: int


_LINE_BREAKS = "\n\r\u2028\u2029"
_SPACES = " \t\v\f\ufeff\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u202f\u205f\u3000"
_IDENT_ESCAPE = r"\\u(?:[0-9a-fA-F]{4}|\{[0-9a-fA-F]+\})"
_IDENT = re.compile(rf"(?:[^\W\d]|[$]|{_IDENT_ESCAPE})(?:[\w$\u200c\u200d]|{_IDENT_ESCAPE})*")
_NUMBER = re.compile(
    r"0[xXoObB][0-9a-fA-F_]+n?|(?:\d[\d_]*(?:\.[\d_]*)?|\.\d[\d_]*)(?:[eE][+-]?\d[\d_]*)?n?"
)
_PUNCTUATORS = (
    ">>>=", "...", "===", "!==", "**=", "<<=", ">>=", ">>>", "&&=", "||=", "??=",
    "=>", "==", "!=", "<=", ">=", "&&", "||", "??", "?.", "++", "--", "+=", "-=",
    "*=", "/=", "%=", "&=", "|=", "^=", "<<", ">>", "**",
)  # fmt: skip
#: after these a ``/`` is division; after any other punctuator it starts a regex
_EXPRESSION_ENDS = frozenset({")", "]", "}", "++", "--"})
#: keywords after which an expression (so possibly a regex) starts
_EXPRESSION_KEYWORDS = frozenset(
    {"return", "typeof", "instanceof", "in", "of", "new", "delete", "void", "throw",
     "case", "do", "else", "yield", "await", "extends"}
)  # fmt: skip
#: keywords whose parenthesised condition may be followed by a statement starting with a regex
_CONDITION_KEYWORDS = frozenset({"if", "while", "for", "with"})
_SIMPLE_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", "b": "\b", "f": "\f", "v": "\v"}


def tokenize(code: str) -> list[Token]:
    """The tokens of ``code``, comments dropped (see the module docstring)."""
    return _Lexer(code).run()


class _Lexer:
    def __init__(self, code: str) -> None:
        self.code = code
        self.pos = 0
        self.line = 1
        self.tokens: list[Token] = []
        self.braces: list[str] = []  # what each open { is: "template" (${), "block", "object"
        self.parens: list[bool] = []  # True: the ( of if/while/for/with, after which / is a regex
        self.regex_allowed = True

    def run(self) -> list[Token]:
        code = self.code
        if code.startswith("#!"):
            self._skip_to_line_end()
        while self.pos < len(code):
            char = code[self.pos]
            if char in _SPACES:
                self.pos += 1
            elif char in _LINE_BREAKS:
                self._line_break()
            elif code.startswith("//", self.pos):
                self._skip_to_line_end()
            elif code.startswith("/*", self.pos):
                self._block_comment()
            elif char in "'\"":
                self._string(char)
            elif char == "`":
                self.pos += 1
                self._template_chunk(first=True)
            elif char == "}" and self.braces and self.braces[-1] == "template":
                self.braces.pop()
                self.pos += 1
                self._template_chunk(first=False)
            elif char == "/" and self.regex_allowed:
                self._regex()
            elif char.isdigit() or (char == "." and code[self.pos + 1 : self.pos + 2].isdigit()):
                self._match(_NUMBER, "number", regex_after=False)
            elif (match := _IDENT.match(code, self.pos)) is not None:
                name = _decode_identifier(match.group())
                self._emit("name", name, regex_after=name in _EXPRESSION_KEYWORDS)
                self.pos = match.end()
            else:
                self._punctuator()
        return self.tokens

    # -- pieces ----------------------------------------------------------------------

    def _emit(self, kind: str, value: str, *, regex_after: bool, line: int | None = None) -> None:
        self.tokens.append(Token(kind, value, self.line if line is None else line))
        self.regex_allowed = regex_after

    def _line_break(self) -> None:
        if self.code.startswith("\r\n", self.pos):
            self.pos += 1
        self.pos += 1
        self.line += 1

    def _skip_to_line_end(self) -> None:
        while self.pos < len(self.code) and self.code[self.pos] not in _LINE_BREAKS:
            self.pos += 1

    def _block_comment(self) -> None:
        end = self.code.find("*/", self.pos + 2)
        end = len(self.code) if end < 0 else end + 2
        self.line += _count_lines(self.code[self.pos : end])
        self.pos = end

    def _match(self, pattern: re.Pattern[str], kind: str, *, regex_after: bool) -> None:
        match = pattern.match(self.code, self.pos)
        text = match.group() if match else self.code[self.pos]
        self._emit(kind, text, regex_after=regex_after)
        self.pos += len(text)

    def _punctuator(self) -> None:
        code, pos = self.code, self.pos
        text = next((p for p in _PUNCTUATORS if code.startswith(p, pos)), code[pos])
        if text == "?." and code[pos + 2 : pos + 3].isdigit():
            text = "?"  # a ? .5 : b
        regex_after = text not in _EXPRESSION_ENDS
        if text == "{":
            self.braces.append("object" if self._expression_expected() else "block")
        elif text == "}":
            regex_after = bool(self.braces) and self.braces.pop() == "block"
        elif text == "(":
            previous = self.tokens[-1] if self.tokens else None
            self.parens.append(previous is not None and previous.kind == "name" and previous.value in _CONDITION_KEYWORDS)
        elif text == ")":
            regex_after = bool(self.parens) and self.parens.pop()
        self._emit("punct", text, regex_after=regex_after)
        self.pos += len(text)

    def _expression_expected(self) -> bool:
        """Whether a ``{`` here opens an object literal rather than a block."""
        if not self.tokens:
            return False
        previous = self.tokens[-1]
        if previous.kind == "punct":
            return previous.value not in (";", "{", "}", ")", "=>") and self.regex_allowed
        if previous.kind == "template-part":
            return True
        return previous.kind == "name" and previous.value in _EXPRESSION_KEYWORDS - {"do", "else"}

    def _string(self, quote: str) -> None:
        start_line = self.line
        value, pos, code = [], self.pos + 1, self.code
        while pos < len(code) and code[pos] != quote:
            char = code[pos]
            if char == "\\":
                text, pos = self._escape(pos)
                value.append(text)
                continue
            if char in "\n\r":
                break  # unterminated: Node reports the SyntaxError
            value.append(char)
            pos += 1
        self.pos = pos + 1
        self._emit("string", "".join(value), regex_after=False, line=start_line)

    def _template_chunk(self, *, first: bool) -> None:
        """From just after `` ` `` or a substitution's ``}`` to the next ``${`` or `` ` ``."""
        start_line = self.line
        value, pos, code = [], self.pos, self.code
        while pos < len(code):
            char = code[pos]
            if char == "`":
                self.pos = pos + 1
                kind = "template" if first else "template-part"
                self._emit(kind, "".join(value), regex_after=False, line=start_line)
                return
            if code.startswith("${", pos):
                self.pos = pos + 2
                self.braces.append("template")
                self._emit("template-part", "".join(value), regex_after=True, line=start_line)
                return
            if char == "\\":
                text, pos = self._escape(pos)
                value.append(text)
                continue
            if char in _LINE_BREAKS:
                self.line += 1
                if code.startswith("\r\n", pos):
                    pos += 1
            value.append(char)
            pos += 1
        self.pos = pos
        self._emit("template-part", "".join(value), regex_after=False, line=start_line)

    def _escape(self, pos: int) -> tuple[str, int]:
        """Decode the escape at ``pos`` (a backslash); return its text and the next offset."""
        code = self.code
        char = code[pos + 1 : pos + 2]
        if char == "":
            return "", pos + 1
        if char in _SIMPLE_ESCAPES:
            return _SIMPLE_ESCAPES[char], pos + 2
        if char in _LINE_BREAKS:  # line continuation
            self.line += 1
            return "", pos + (3 if code.startswith("\r\n", pos + 1) else 2)
        if char == "x" and re.fullmatch(r"[0-9a-fA-F]{2}", code[pos + 2 : pos + 4]):
            return chr(int(code[pos + 2 : pos + 4], 16)), pos + 4
        if char == "u":
            match = re.compile(r"u(?:([0-9a-fA-F]{4})|\{([0-9a-fA-F]{1,6})\})").match(code, pos + 1)
            if match:
                number = int(match.group(1) or match.group(2), 16)
                return (chr(number) if number <= 0x10FFFF else ""), match.end()
        if char in "01234567":  # legacy octal, sloppy mode
            match = re.compile(r"[0-3]?[0-7]{1,2}|[0-7]").match(code, pos + 1)
            assert match is not None
            return chr(int(match.group(), 8)), match.end()
        return char, pos + 2

    def _regex(self) -> None:
        code, pos, in_class = self.code, self.pos + 1, False
        while pos < len(code):
            char = code[pos]
            if char in _LINE_BREAKS:
                break  # not a regex after all: treat the slash as division
            if char == "\\":
                pos += 2
                continue
            if char == "[":
                in_class = True
            elif char == "]":
                in_class = False
            elif char == "/" and not in_class:
                flags = re.compile(r"[\w$]*").match(code, pos + 1)
                end = flags.end() if flags else pos + 1
                self._emit("regex", code[self.pos : end], regex_after=False)
                self.pos = end
                return
            pos += 1
        self._emit("punct", "/", regex_after=True)
        self.pos += 1


def _decode_identifier(text: str) -> str:
    if "\\" not in text:
        return text
    def decode(match: re.Match[str]) -> str:
        number = int(match.group()[2:].strip("{}"), 16)
        return chr(number) if number <= 0x10FFFF else ""

    return re.sub(_IDENT_ESCAPE, decode, text)


def _count_lines(text: str) -> int:
    return len(re.findall(r"\r\n|[\n\r\u2028\u2029]", text))
