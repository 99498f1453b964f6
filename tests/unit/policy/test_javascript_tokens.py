"""The JavaScript tokenizer under the JavaScript rules: comments, strings, templates,
regular expressions and line numbers."""

from __future__ import annotations

import pytest

from execbox.policy.javascript_tokens import tokenize

__all__: list[str] = []


def kinds(code: str) -> list[tuple[str, str]]:
    return [(t.kind, t.value) for t in tokenize(code)]


def test_comments_are_dropped_and_strings_decoded() -> None:
    assert kinds("a // b\n/* c */ 'd\\x65' \"\\u{66}\"") == [
        ("name", "a"), ("string", "de"), ("string", "f"),
    ]  # fmt: skip


def test_template_with_substitutions_keeps_its_code() -> None:
    assert kinds("`a${ {b: `c${d}`}.b }e`") == [
        ("template-part", "a"), ("punct", "{"), ("name", "b"), ("punct", ":"),
        ("template-part", "c"), ("name", "d"), ("template-part", ""), ("punct", "}"),
        ("punct", "."), ("name", "b"), ("template-part", "e"),
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("code", "regex"),
    [
        ("x = /a'b/g", "/a'b/g"),
        ("return /[/]x/", "/[/]x/"),
        ("f(/x/)", "/x/"),
        ("if (a) /x/.test(b)", "/x/"),
        ("{}\n/x/.test(b)", "/x/"),
    ],
)
def test_regex_literals(code: str, regex: str) -> None:
    assert ("regex", regex) in kinds(code)


@pytest.mark.parametrize("code", ["a / b / c", "f(x) / 2", "x[1] / y", "i++ / 2", "({}) / 1"])
def test_division_is_not_a_regex(code: str) -> None:
    assert all(kind != "regex" for kind, _ in kinds(code))


def test_line_numbers_count_every_line_terminator() -> None:
    tokens = tokenize("a\r\nb\rc\u2028d /* \n */ e `\n` f")
    assert [(t.value, t.line) for t in tokens] == [
        ("a", 1), ("b", 2), ("c", 3), ("d", 4), ("e", 5), ("\n", 5), ("f", 6),
    ]  # fmt: skip


def test_unterminated_input_does_not_raise() -> None:
    for code in ["'abc", "`abc${", "/* abc", "x = /abc", "a\\", "`${`${"]:
        tokenize(code)
