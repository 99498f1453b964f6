"""Tests for the Python AST policy (execbox.policy.python_ast) and its dispatcher."""

from __future__ import annotations

import textwrap

import pytest

from execbox.policy import Finding, inspect_code
from execbox.policy.python_ast import (
    BLOCKED_ATTRIBUTES,
    BLOCKED_CALLS,
    BLOCKED_MODULES,
    TOO_DEEP_MESSAGE,
    inspect_python,
)

__all__: list[str] = []


def messages(code: str) -> list[str]:
    return [f.message for f in inspect_python(textwrap.dedent(code))]


# --- imports ---------------------------------------------------------------------


@pytest.mark.parametrize("module", sorted(BLOCKED_MODULES))
def test_import_of_each_blocked_module_is_rejected(module: str) -> None:
    assert messages(f"import {module}") == [f"Import of '{module}' is not allowed"]


@pytest.mark.parametrize("module", sorted(BLOCKED_MODULES))
def test_from_import_of_each_blocked_module_is_rejected(module: str) -> None:
    assert messages(f"from {module} import x") == [f"Import of '{module}' is not allowed"]


@pytest.mark.parametrize(
    ("code", "name"),
    [
        ("import os.path", "os.path"),
        ("import os.path as osp", "os.path"),
        ("import os as o", "os"),
        ("from os import path", "os"),
        ("from os import *", "os"),
        ("from os.path import join", "os.path"),
        ("import http.client", "http.client"),
        ("from http.client import HTTPConnection", "http.client"),
        ("from http import client", "http.client"),
        ("import importlib.util", "importlib.util"),
        ("from multiprocessing.pool import Pool", "multiprocessing.pool"),
        ("import json, subprocess", "subprocess"),
    ],
)
def test_import_forms_are_rejected(code: str, name: str) -> None:
    assert messages(code) == [f"Import of '{name}' is not allowed"]


@pytest.mark.parametrize(
    "code",
    [
        "import numpy",
        "import numpy as np",
        "import pandas as pd",
        "from matplotlib import pyplot",
        "import matplotlib.pyplot as plt",
        "import json",
        "import math",
        "import requests",
        "import re",
        "import datetime",
        "from datetime import datetime, timedelta",
        "import http",
        "import http.cookies",
        "from http import cookies, HTTPStatus",
        "import codecs",
        "import osmnx",
        "import system_utils",
        "from . import os",
        "from .sys import x",
        "import collections, itertools, functools",
    ],
)
def test_allowed_imports(code: str) -> None:
    assert messages(code) == []


# --- calls -----------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(BLOCKED_CALLS))
def test_bare_call_of_each_blocked_builtin_is_rejected(name: str) -> None:
    assert messages(f"{name}('x')") == [f"Call of '{name}' is not allowed"]


@pytest.mark.parametrize("name", sorted(BLOCKED_CALLS))
def test_builtins_attribute_call_is_rejected(name: str) -> None:
    assert messages(f"builtins.{name}('x')") == [
        f"Call of 'builtins.{name}' is not allowed"
    ]


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("__import__('os')", ["Call of '__import__' is not allowed"]),
        ("getattr(x, 'y')", ["Call of 'getattr' is not allowed"]),
        ("x = eval('1 + 1')", ["Call of 'eval' is not allowed"]),
        ("print(open('/etc/passwd').read())", ["Call of 'open' is not allowed"]),
        (
            "__builtins__.eval('1')",
            [
                "Access to '__builtins__' is not allowed",
                "Call of '__builtins__.eval' is not allowed",
            ],
        ),
        ("__builtins__['eval']('1')", ["Access to '__builtins__' is not allowed"]),
        ("f = eval", ["Use of 'eval' is not allowed"]),
        ("list(map(getattr, objs, names))", ["Use of 'getattr' is not allowed"]),
        ("g = builtins.exec", ["Use of 'builtins.exec' is not allowed"]),
        (
            "__builtins__.__import__",
            [
                "Access to '__builtins__' is not allowed",
                "Use of '__builtins__.__import__' is not allowed",
            ],
        ),
        (
            "print.__self__.__import__('os')",
            [
                "Access to '__import__' is not allowed",
                "Access to '__self__' is not allowed",
            ],
        ),
        ("x = [eval(s) for s in items]", ["Call of 'eval' is not allowed"]),
        ("f = lambda s: exec(s)", ["Call of 'exec' is not allowed"]),
        ("s = f'{eval(code)}'", ["Call of 'eval' is not allowed"]),
        ("@breakpoint\ndef f(): pass", ["Use of 'breakpoint' is not allowed"]),
    ],
)
def test_call_forms_are_rejected(code: str, expected: list[str]) -> None:
    assert messages(code) == expected


@pytest.mark.parametrize(
    "code",
    [
        "df.eval('a + b')",
        "obj.eval()",
        "model.compile(optimizer='adam')",
        "pattern = re.compile(r'\\d+')",
        "df.open()",
        "fh.input('x')",
        "config.getattr('name')",
        "def open_file(path):\n    return path\nopen_file('a')",
        "evaluate(1)",
        "my_eval = 3",
        "def main(input: str) -> dict:\n    return {'out': input.upper()}",
        "def f(vars):\n    return vars",
        "def main(**kwargs):\n    return kwargs",
    ],
)
def test_allowed_calls_and_names(code: str) -> None:
    assert messages(code) == []


# --- attributes ------------------------------------------------------------------


@pytest.mark.parametrize("attr", sorted(BLOCKED_ATTRIBUTES))
def test_access_to_each_blocked_attribute_is_rejected(attr: str) -> None:
    assert messages(f"y = x.{attr}") == [f"Access to '{attr}' is not allowed"]


def test_classic_subclasses_escape_is_rejected() -> None:
    code = "().__class__.__base__.__subclasses__()"
    assert messages(code) == [
        "Access to '__base__' is not allowed",
        "Access to '__subclasses__' is not allowed",
    ]


def test_generator_frame_escape_is_rejected() -> None:
    code = "g = (g.gi_frame.f_back.f_globals for _ in [1])"
    assert messages(code) == [
        "Access to 'f_back' is not allowed",
        "Access to 'f_globals' is not allowed",
        "Access to 'gi_frame' is not allowed",
    ]


@pytest.mark.parametrize(
    "code",
    [
        "name = type(x).__name__",
        "cls = x.__class__.__name__",
        "def __init__(self):\n    self.__private = 1",
        "d = obj.items()",
    ],
)
def test_allowed_attributes(code: str) -> None:
    assert messages(code) == []


# --- nesting and line numbers ----------------------------------------------------


NESTED = {
    "function": "def main():\n    import os\n    return os.getcwd()",
    "method": "class A:\n    def run(self):\n        from subprocess import run",
    "async_function": "async def main():\n    x = 1\n\n    return eval('x')",
    "async_method": (
        "class B:\n    async def go(self):\n        async with lock:\n"
        "            return ().__class__.__subclasses__()"
    ),
    "multiline_import": "import json\nfrom os import (\n    path,\n)",
    "except_handler": "try:\n    pass\nexcept Exception:\n    exec('1')",
    "decorated": "@functools.cache\ndef f():\n    return [compile(s) for s in x]",
}


@pytest.mark.parametrize(
    ("case", "line", "message"),
    [
        ("function", 2, "Import of 'os' is not allowed"),
        ("method", 3, "Import of 'subprocess' is not allowed"),
        ("async_function", 4, "Call of 'eval' is not allowed"),
        ("async_method", 4, "Access to '__subclasses__' is not allowed"),
        ("multiline_import", 2, "Import of 'os' is not allowed"),
        ("except_handler", 4, "Call of 'exec' is not allowed"),
        ("decorated", 3, "Call of 'compile' is not allowed"),
    ],
)
def test_nested_code_reports_line(case: str, line: int, message: str) -> None:
    assert inspect_python(NESTED[case]) == [Finding(line, message)]


def test_findings_sorted_and_deduplicated() -> None:
    code = textwrap.dedent(
        """\
        x = eval('1') + eval('2')
        import sys
        import os; import os
        """
    )
    assert inspect_python(code) == [
        Finding(1, "Call of 'eval' is not allowed"),
        Finding(2, "Import of 'sys' is not allowed"),
        Finding(3, "Import of 'os' is not allowed"),
    ]


def test_finding_str() -> None:
    assert str(Finding(3, "Import of 'os' is not allowed")) == (
        "Line 3: Import of 'os' is not allowed"
    )


# --- no false positives ----------------------------------------------------------


@pytest.mark.parametrize(
    "code",
    [
        "x = 1 + 2",
        "s = 'a' + 'b'",
        "y = x * 2",
        "z = 'ab' * 3 + 'c'",
        "name = 'w'\nmsg = f'hello {name}!'",
        "os_version = '1.0'\nprint(os_version)",
        "cmd = 'os.system(\"rm -rf /\")'",
        "s = \"import os; eval('1')\"",
        "# import os\n# eval('x')\nx = 1",
        "def main(a: int, b: int) -> dict:\n    return {'result': a + b}",
        "",
    ],
)
def test_no_false_positives(code: str) -> None:
    assert inspect_python(code) == []


# --- unparseable code ------------------------------------------------------------


@pytest.mark.parametrize(
    "code",
    [
        "def main(:\n    import os",
        "import os\nif True\n    eval('1')",
        "x = (",
        "\tdef f():\n  pass",
        "x = 1\x00",
    ],
)
def test_syntax_error_gives_no_findings(code: str) -> None:
    assert inspect_python(code) == []


def test_deep_but_parseable_code_is_inspected() -> None:
    code = "x = " + "+".join(["1"] * 2000) + "\neval('1')"
    assert inspect_python(code) == [Finding(2, "Call of 'eval' is not allowed")]


def test_code_too_deep_to_parse_fails_closed() -> None:
    code = "x = " + "+".join(["1"] * 100_000) + "\n"
    assert inspect_python(code) == [Finding(1, TOO_DEEP_MESSAGE)]


# --- dispatcher ------------------------------------------------------------------


@pytest.mark.parametrize("language", ["python", "Python"])
def test_inspect_code_python(language: str) -> None:
    assert inspect_code("import os", language) == [
        Finding(1, "Import of 'os' is not allowed")
    ]


@pytest.mark.parametrize("language", ["ruby", "", "py"])
def test_inspect_code_unknown_language(language: str) -> None:
    with pytest.raises(ValueError, match="Unsupported language"):
        inspect_code("x = 1", language)
