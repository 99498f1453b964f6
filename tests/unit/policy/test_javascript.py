"""Tests for the JavaScript pattern policy (execbox.policy.javascript)."""

from __future__ import annotations

import textwrap

import pytest

from execbox.policy import Finding, inspect_code
from execbox.policy.javascript import (
    BLOCKED_MODULES,
    BLOCKED_PROCESS_MEMBERS,
    inspect_javascript,
)

__all__: list[str] = []


def messages(code: str) -> list[str]:
    return [f.message for f in inspect_javascript(textwrap.dedent(code))]


# --- modules ---------------------------------------------------------------------

FORMS = (
    "require({q}{m}{q})",
    "const x = require ( {q}{m}{q} );",
    "const x = await import({q}{m}{q});",
    "import x from {q}{m}{q};",
    "import * as x from {q}{m}{q};",
    "import {{ a, b as c }} from {q}{m}{q};",
    "import {q}{m}{q};",
    "export * from {q}{m}{q};",
)


@pytest.mark.parametrize("module", BLOCKED_MODULES)
@pytest.mark.parametrize("form", FORMS)
def test_each_module_in_each_form_is_rejected(module: str, form: str) -> None:
    code = form.format(q="'", m=module)
    assert messages(code) == [f"Import of '{module}' is not allowed"]


@pytest.mark.parametrize("quote", ["'", '"', "`"])
@pytest.mark.parametrize("prefix", ["", "node:"])
@pytest.mark.parametrize("module", ["child_process", "fs", "fs/promises", "worker_threads"])
def test_quote_styles_and_node_prefix(quote: str, prefix: str, module: str) -> None:
    code = f"const m = require({quote}{prefix}{module}{quote});"
    assert messages(code) == [f"Import of '{module}' is not allowed"]


@pytest.mark.parametrize(
    ("code", "name"),
    [
        ("require(\n  'child_process'\n)", "child_process"),
        ("require\t(\t\"fs\"\t)", "fs"),
        ("module.require('vm')", "vm"),
        ("import {\n  readFile,\n  writeFile,\n} from 'node:fs/promises'", "fs/promises"),
        ("import fs from'fs'", "fs"),
        ("const { spawn } = require('child_process')", "child_process"),
        ("import('inspector/promises')", "inspector/promises"),
    ],
)
def test_module_forms_with_whitespace(code: str, name: str) -> None:
    assert messages(code) == [f"Import of '{name}' is not allowed"]


@pytest.mark.parametrize(
    "code",
    [
        "const axios = require('axios');",
        "const _ = require('lodash');",
        "const crypto = require('crypto');",
        "const path = require('node:path');",
        "const util = require(\"util\");",
        "const os = require('os');",
        "const http = require('http');",
        "import axios from 'axios';",
        "const fse = require('fs-extra');",
        "const n = require('network');",
        "const v = require('vmware');",
        "const f = require('./fs');",
        "const fs = myrequire('fs');",
        "const x = require(`date-fns`);",
        "import { format } from 'date-fns';",
    ],
)
def test_allowed_modules(code: str) -> None:
    assert messages(code) == []


# --- eval / Function ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "message"),
    [
        ("eval('1 + 1')", "Use of 'eval' is not allowed"),
        ("const r = eval (src);", "Use of 'eval' is not allowed"),
        ("globalThis.eval(src)", "Use of 'eval' is not allowed"),
        ("(0, eval)(src)", "Use of 'eval' is not allowed"),
        ("const f = Function('return this')", "Use of 'Function' is not allowed"),
        ("const f = new Function('a', 'return a')", "Use of 'Function' is not allowed"),
        ("const f = new Function;", "Use of 'Function' is not allowed"),
        ("const f = Function ('x')", "Use of 'Function' is not allowed"),
    ],
)
def test_eval_and_function_are_rejected(code: str, message: str) -> None:
    assert messages(code) == [message]


@pytest.mark.parametrize(
    "code",
    [
        "myeval('x')",
        "evaluate(x)",
        "const evalResult = 1;",
        "$eval('x')",
        "page.$eval('x')",
        "isFunction(x)",
        "if (typeof f === 'function') f()",
        "if (f instanceof Function) f()",
        "AsyncFunctionRunner(x)",
        "const myFunction = () => 1; myFunction()",
        "function main(args) { return args.a + args.b; }",
    ],
)
def test_identifiers_containing_words_are_not_flagged(code: str) -> None:
    assert messages(code) == []


def test_comments_and_strings_are_not_code() -> None:
    # tokens, not text: a comment or a string that mentions eval is not a use of eval
    assert messages("// never eval input\nconst x = 1;") == []
    assert messages("/* require('child_process') */ const s = 'eval(x)';") == []
    assert messages("const s = `process.binding ${1 + 1} eval`;") == []


# --- process -------------------------------------------------------------------------


@pytest.mark.parametrize("member", BLOCKED_PROCESS_MEMBERS)
def test_each_process_member_is_rejected(member: str) -> None:
    assert messages(f"process.{member}") == [
        f"Access to 'process.{member}' is not allowed"
    ]


@pytest.mark.parametrize(
    ("code", "member"),
    [
        ("process.binding('spawn_sync')", "binding"),
        ("process . dlopen(m, f)", "dlopen"),
        ("process['binding']('fs')", "binding"),
        ('process[ "kill" ](1)', "kill"),
        ("globalThis.process.mainModule", "mainModule"),
    ],
)
def test_process_member_forms(code: str, member: str) -> None:
    assert messages(code) == [f"Access to 'process.{member}' is not allowed"]


@pytest.mark.parametrize(
    "code",
    [
        "console.log(process.env.HOME)",
        "process.stdout.write('x')",
        "process.exit(0)",
        "child.kill()",
        "myprocess.binding",
        "process.bindings",
        "process.killAll",
    ],
)
def test_allowed_process_use(code: str) -> None:
    assert messages(code) == []


# --- line numbers ----------------------------------------------------------------------


def test_line_numbers_are_reported() -> None:
    code = textwrap.dedent(
        """\
        const axios = require('axios');

        function main() {
          const cp = require("child_process");
          return eval('1');
        }
        import {
          readFile,
        } from 'fs';
        process.kill(1);
        """
    )
    assert inspect_javascript(code) == [
        Finding(4, "Import of 'child_process' is not allowed"),
        Finding(5, "Use of 'eval' is not allowed"),
        Finding(7, "Import of 'fs' is not allowed"),
        Finding(10, "Access to 'process.kill' is not allowed"),
    ]


@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"])
def test_line_numbers_with_any_line_ending(newline: str) -> None:
    code = newline.join(["const a = 1;", "", "eval(x);"])
    assert inspect_javascript(code) == [Finding(3, "Use of 'eval' is not allowed")]


def test_findings_sorted_and_deduplicated() -> None:
    code = "eval(a); eval(b);\nrequire('fs'); require('fs');\nFunction('x')"
    assert inspect_javascript(code) == [
        Finding(1, "Use of 'eval' is not allowed"),
        Finding(2, "Import of 'fs' is not allowed"),
        Finding(3, "Use of 'Function' is not allowed"),
    ]


def test_empty_and_clean_code() -> None:
    assert inspect_javascript("") == []
    assert inspect_javascript("const add = (a, b) => a + b;\nmodule.exports = add;") == []


@pytest.mark.parametrize("language", ["nodejs", "javascript", "NodeJS"])
def test_inspect_code_dispatches_javascript(language: str) -> None:
    assert inspect_code("require('fs')", language) == [
        Finding(1, "Import of 'fs' is not allowed")
    ]
