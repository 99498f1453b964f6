"""Ways around the static check (issue 9, item 7): each is rejected under block AND guard.

Every case runs real code that would reach a process, native code, dynamic code or the
interpreter's internals if the check let it through; the assertion names the rule (or
the message) that must catch it, so a rule that stops matching fails here.
"""

from __future__ import annotations

import textwrap

import pytest

from execbox.policy import Finding, inspect_code
from execbox.settings import CodeCheckMode

__all__: list[str] = []

BOTH = pytest.mark.parametrize("mode", [CodeCheckMode.BLOCK, CodeCheckMode.GUARD])


def findings(code: str, mode: CodeCheckMode) -> list[Finding]:
    return inspect_code(textwrap.dedent(code), "python", mode)


BYPASSES = {
    "pathlib_os_popen": "import pathlib\ndef main():\n    return pathlib.os.popen('id').read()\n",
    "shutil_os_system": "import shutil\nshutil.os.system('id')\n",
    "tempfile_private_os": "import tempfile\ntempfile._os.system('id')\n",
    "logging_os_via_from_import": "from logging import os\nos.system('id')\n",
    "chain_assigned_to_a_name": "import pathlib\nm = pathlib.os\nm.system('id')\n",
    "chain_through_an_assigned_module": "import pathlib\np = pathlib\np.os.execv('/bin/sh', ['sh'])\n",
    "posix_directly": "import posix\nposix.system('id')\n",
    "alias_import_os_as_o": "import os as o\no.system('id')\n",
    "alias_from_os_import_system_as_s": "from os import system as s\ns('id')\n",
    "alias_subprocess": "import subprocess as sp\nsp.run(['id'])\n",
    "alias_from_subprocess": "from subprocess import check_output as co\nco(['id'])\n",
    "getattr_computed_on_module": "import pathlib\ngetattr(pathlib, 'o' + 's').system('id')\n",
    "getattr_computed_name_variable": "import os\nname = 'system'\ngetattr(os, name)('id')\n",
    "getattr_literal_reaching_os": "import pathlib\ngetattr(pathlib, 'os').system('id')\n",
    "getattr_literal_system": "import os\ngetattr(os, 'system')('id')\n",
    "import_concatenated": "__import__('o' + 's').system('id')\n",
    "import_bytes_decode": "__import__(b'os'.decode()).system('id')\n",
    "import_chr_join": "__import__(''.join(map(chr, [111, 115]))).system('id')\n",
    "import_literal_then_system": "__import__('os').system('id')\n",
    "importlib_computed": "import importlib\nimportlib.import_module('sub' + 'process').run(['id'])\n",
    "importlib_literal_subprocess": "import importlib\nimportlib.import_module('subprocess').run(['id'])\n",
    "builtins_dict_walk": "import builtins\nbuiltins.__dict__['__import__']('os')\n",
    "builtins_subscript": "__builtins__['__import__']('os')\n",
    "module_dict_walk": "import pathlib\npathlib.__dict__['os'].system('id')\n",
    "subclasses_walk": "().__class__.__base__.__subclasses__()\n",
    "globals_walk": "def f():\n    pass\nf.__globals__['__builtins__']\n",
    "frame_walk": "g = (x for x in [1])\ng.gi_frame.f_back.f_globals\n",
    "attrgetter_reaching_os": "import operator, pathlib\noperator.attrgetter('os')(pathlib).system('id')\n",
    "attrgetter_computed": "import operator\noperator.attrgetter('o' + 's')\n",
    "resolve_name_literal": "import pkgutil\npkgutil.resolve_name('os:system')('id')\n",
    "resolve_name_computed": "import pkgutil\npkgutil.resolve_name(name)\n",
    "star_import": "from os import *\nsystem('id')\n",
    "walrus_chain": "import pathlib\n(m := pathlib.os).system('id')\n",
    "timeit_literal_source": "import timeit\ntimeit.timeit(\"__import__('os').system('id')\", number=1)\n",
    "timeit_computed_source": "import timeit\ndef g(s):\n    return timeit.timeit(s)\n",
    "cprofile_literal_source": "import cProfile\ncProfile.run('import subprocess')\n",
}


@BOTH
@pytest.mark.parametrize("case", sorted(BYPASSES))
def test_bypass_is_rejected(case: str, mode: CodeCheckMode) -> None:
    assert findings(BYPASSES[case], mode), f"{case} passed under {mode.value}"


@BOTH
def test_pathlib_os_popen_is_reported_at_its_line(mode: CodeCheckMode) -> None:
    result = findings(BYPASSES["pathlib_os_popen"], mode)
    assert [f.line for f in result] == [3]
    expected_rule = "module-chain" if mode is CodeCheckMode.BLOCK else "process"
    assert result[0].rule == expected_rule
    assert str(result[0]).startswith("Line 3: ")


@pytest.mark.parametrize(
    ("case", "rule"),
    [
        ("pathlib_os_popen", "process"),
        ("alias_import_os_as_o", "process"),
        ("alias_from_os_import_system_as_s", "process"),
        ("getattr_computed_on_module", "computed-name"),
        ("getattr_literal_system", "process"),
        ("import_concatenated", "dynamic-code"),
        ("import_literal_then_system", "process"),
        ("importlib_computed", "dynamic-code"),
        ("builtins_dict_walk", "internals"),
        ("module_dict_walk", "internals"),
        ("subclasses_walk", "internals"),
        ("frame_walk", "internals"),
        ("chain_assigned_to_a_name", "process"),
        ("tempfile_private_os", "process"),
        ("star_import", "process"),
        ("walrus_chain", "process"),
        ("timeit_literal_source", "process"),
        ("timeit_computed_source", "dynamic-code"),
    ],
)
def test_guard_names_the_rule(case: str, rule: str) -> None:
    assert rule in {f.rule for f in findings(BYPASSES[case], CodeCheckMode.GUARD)}


def test_block_rejects_the_chain_itself() -> None:
    # under block, reaching os at all is enough: os is a blocked module
    assert findings("import pathlib\nx = pathlib.os\n", CodeCheckMode.BLOCK) == [
        Finding(2, "Access to 'os' through another module is not allowed")
    ]
    assert findings("from pathlib import os\n", CodeCheckMode.BLOCK) == [
        Finding(1, "Import of 'pathlib.os' is not allowed")
    ]


def test_finding_carries_its_rule_in_the_rendered_line() -> None:
    (finding,) = findings("import pathlib\npathlib.os.popen('id')\n", CodeCheckMode.GUARD)
    assert str(finding) == "Line 2: Use of 'os.popen' is not allowed [process]"
