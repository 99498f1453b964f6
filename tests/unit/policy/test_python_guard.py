"""The guard rules for Python: what they reject, and the everyday code they let through."""

from __future__ import annotations

import textwrap

import pytest

from execbox.policy import inspect_code
from execbox.settings import CodeCheckMode

__all__: list[str] = []


def guard(code: str) -> list[str]:
    return [str(f) for f in inspect_code(textwrap.dedent(code), "python", CodeCheckMode.GUARD)]


def rules(code: str) -> set[str]:
    return {f.rule for f in inspect_code(textwrap.dedent(code), "python", CodeCheckMode.GUARD)}


# --- everyday code passes -------------------------------------------------------------

EVERYDAY = {
    "import_os_and_path": "import os\ndef main():\n    return os.path.join(os.getcwd(), 'a')\n",
    "makedirs_and_listdir": "import os\nos.makedirs('artifacts', exist_ok=True)\nprint(os.listdir('.'))\n",
    "environ": "import os\nmode = os.environ.get('MODE', 'demo')\nos.environ['X'] = '1'\n",
    "os_path_from_import": "from os import path, makedirs\nmakedirs(path.join('a', 'b'), exist_ok=True)\n",
    "open_a_file": "def main():\n    with open('artifacts/out.csv', 'w') as f:\n        f.write('a,b\\n')\n",
    "open_for_reading": "data = open('config.json').read()\n",
    "getattr_literal": "def main(obj):\n    return getattr(obj, 'name', None)\n",
    "getattr_on_self": "class A:\n    def get(self, field):\n        return getattr(self, field)\n",
    "getattr_on_a_parameter": "def pick(record, key):\n    return getattr(record, key)\n",
    "setattr_on_self": "class A:\n    def __init__(self, **kw):\n        for k, v in kw.items():\n            setattr(self, k, v)\n",
    "sys_version": "import sys\ndef main():\n    return {'v': sys.version, 'p': sys.platform}\n",
    "sys_stdout_and_exit": "import sys\nsys.stdout.write('x')\nsys.exit(0)\n",
    "json_pathlib": "import json\nfrom pathlib import Path\nPath('a.json').write_text(json.dumps({'a': 1}))\n",
    "shutil_copy": "import shutil\nshutil.copy('a', 'b')\nshutil.rmtree('tmpdir', ignore_errors=True)\n",
    "pandas_numpy": "import numpy as np\nimport pandas as pd\ndf = pd.DataFrame({'a': np.arange(3)})\ndf.eval('b = a + 1')\n",
    "matplotlib": "import matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot as plt\nplt.savefig('artifacts/c.png')\n",
    "comment_mentions_eval": "# never eval() input or call subprocess\nx = 1\n",
    "string_mentions_eval": "s = 'eval(x); import subprocess; os.system(\"id\")'\nprint(s)\n",
    "docstring_mentions_exec": 'def main():\n    """Uses exec, eval and __import__ nowhere."""\n    return 1\n',
    "eval_of_a_literal": "x = eval('1 + 2')\n",
    "exec_of_a_literal": "exec('y = [i * i for i in range(3)]')\n",
    "threading": "import threading\nt = threading.Thread(target=print)\nt.start()\nt.join()\n",
    "concurrent_threads": "from concurrent.futures import ThreadPoolExecutor\nwith ThreadPoolExecutor(2) as ex:\n    list(ex.map(str, [1]))\n",
    "dunder_dict_of_own_object": "class A:\n    pass\na = A()\nprint(a.__dict__)\n",
    "vars_of_own_object": "def main(obj):\n    return vars(obj)\n",
    "class_name": "def main(x):\n    return type(x).__name__ + x.__class__.__name__\n",
    "traceback_print": "import traceback\ntry:\n    1 / 0\nexcept Exception as e:\n    traceback.print_exception(e)\n",
    "inspect_signature": "import inspect\nprint(inspect.signature(print))\n",
    "importlib_literal": "import importlib\njson = importlib.import_module('json')\n",
    "importlib_find_spec": "import importlib.util\nprint(importlib.util.find_spec('numpy') is not None)\n",
    "re_compile": "import re\np = re.compile(r'\\d+')\n",
    "pickle_dumps": "import pickle\nb = pickle.dumps({'a': 1})\n",
    "sockets_left_to_isolation": "import socket\nsocket.gethostname()\n",
    "star_import_of_harmless_names": "from os import *\nmakedirs('a', exist_ok=True)\nprint(getcwd())\n",
    "timeit_of_a_function": "import timeit\ndef f():\n    return sum(range(9))\ntimeit.timeit(f, number=3)\n",
    "timeit_of_a_lambda_and_a_literal": "import timeit\ntimeit.timeit(lambda: 1)\ntimeit.timeit('x = 1')\n",
    "functions_passed_around": "import json\nfrom json import dumps\nprint(list(map(dumps, [1])), json.dumps)\n",
}


@pytest.mark.parametrize("case", sorted(EVERYDAY))
def test_everyday_code_passes_under_guard(case: str) -> None:
    assert guard(EVERYDAY[case]) == []


@pytest.mark.parametrize(
    "case", ["import_os_and_path", "open_a_file", "getattr_literal", "sys_version", "comment_mentions_eval"]
)
def test_block_keeps_ragflow_rules_for_the_same_code(case: str) -> None:
    # RAGFlow's suite expects `import os`, open() and getattr() to be rejected: block does
    expected_empty = case == "comment_mentions_eval"
    result = inspect_code(EVERYDAY[case], "python", CodeCheckMode.BLOCK)
    assert (result == []) is expected_empty, result


# --- what guard rejects ---------------------------------------------------------------

REJECTED = {
    # processes
    "import_subprocess": ("import subprocess\n", "process"),
    "from_subprocess": ("from subprocess import Popen\n", "process"),
    "os_system": ("import os\nos.system('id')\n", "process"),
    "os_popen": ("import os\nos.popen('id')\n", "process"),
    "os_execv": ("import os\nos.execv('/bin/sh', ['sh'])\n", "process"),
    "os_spawnl": ("import os\nos.spawnl(os.P_WAIT, '/bin/true', 'true')\n", "process"),
    "os_fork": ("import os\nos.fork()\n", "process"),
    "os_kill": ("import os\nos.kill(1, 9)\n", "process"),
    "os_posix_spawn": ("import os\nos.posix_spawn('/bin/true', ['true'], {})\n", "process"),
    "pty": ("import pty\npty.spawn('/bin/sh')\n", "process"),
    "multiprocessing": ("import multiprocessing\n", "process"),
    "from_multiprocessing": ("from multiprocessing import Pool\n", "process"),
    "process_pool": ("from concurrent.futures import ProcessPoolExecutor\n", "process"),
    "asyncio_subprocess": ("import asyncio\nasyncio.create_subprocess_exec('id')\n", "process"),
    "loop_subprocess": ("async def f(loop):\n    await loop.subprocess_exec(p, 'id')\n", "process"),
    # native code
    "ctypes": ("import ctypes\n", "native-code"),
    "from_ctypes": ("from ctypes import CDLL\n", "native-code"),
    "cffi": ("import cffi\n", "native-code"),
    "numpy_ctypeslib": ("import numpy as np\nnp.ctypeslib.load_library('x', '.')\n", "native-code"),
    "extension_loader": ("import importlib.machinery\n", "native-code"),
    "spec_from_file": ("import importlib.util\nimportlib.util.spec_from_file_location('m', 'm.so')\n", "native-code"),
    # dynamic code
    "eval_computed": ("def main(expr):\n    return eval(expr)\n", "dynamic-code"),
    "exec_computed": ("code = 'import os'\nexec(code)\n", "dynamic-code"),
    "exec_fstring": ("exec(f'import {name}')\n", "dynamic-code"),
    "compile_computed": ("compile(src, 'x', 'exec')\n", "dynamic-code"),
    "exec_literal_with_subprocess": ("exec('import subprocess')\n", "process"),
    "eval_literal_with_system": ("eval(\"__import__('os').system('id')\")\n", "process"),
    "exec_nested_literal": ("exec(\"exec('import ctypes')\")\n", "native-code"),
    "eval_as_value": ("f = eval\nf('1')\n", "dynamic-code"),
    "builtins_eval_computed": ("import builtins\nbuiltins.eval(s)\n", "dynamic-code"),
    "import_computed": ("m = __import__(name)\n", "dynamic-code"),
    "import_subprocess_literal": ("__import__('subprocess')\n", "process"),
    "import_module_computed": ("import importlib\nimportlib.import_module(name)\n", "dynamic-code"),
    "runpy": ("import runpy\n", "dynamic-code"),
    "code_module": ("import code\ncode.interact()\n", "dynamic-code"),
    "pickle_loads": ("import pickle\npickle.loads(b'cos\\nsystem\\n(S\"id\"\\ntR.')\n", "dynamic-code"),
    "code_type": ("import types\ntypes.CodeType\n", "dynamic-code"),
    # interpreter internals
    "sys_getframe": ("import sys\nsys._getframe(1)\n", "internals"),
    "sys_modules": ("import sys\nsys.modules['os']\n", "internals"),
    "gc_get_objects": ("import gc\ngc.get_objects()\n", "internals"),
    "inspect_currentframe": ("import inspect\ninspect.currentframe().f_back\n", "internals"),
    "subclasses": ("object.__subclasses__()\n", "internals"),
    "globals_attr": ("def f():\n    pass\nf.__globals__\n", "internals"),
    "code_attr": ("def f():\n    pass\nf.__code__\n", "internals"),
    "builtins_name": ("__builtins__.__import__('os')\n", "internals"),
    "globals_call": ("globals()['__builtins__']\n", "internals"),
    "vars_of_module": ("import os\nvars(os)['system']\n", "internals"),
    "type_dict": ("type.__dict__['__subclasses__'](object)\n", "internals"),
    "print_self": ("print.__self__.__import__('os')\n", "internals"),
    "breakpoint": ("breakpoint()\n", "internals"),
    # ways around the names
    "getattr_computed_on_unknown": ("def main(name):\n    return getattr(type, name)\n", "computed-name"),
    "getattr_as_value": ("import functools\nfunctools.reduce(getattr, ['os'], m)\n", "computed-name"),
    "module_passed_as_value": ("import pathlib\ndef g(m, n):\n    return getattr(m, n)\ng(pathlib, 'os')\n", "module-value"),
    "module_in_a_list": ("import os\nmods = [os]\n", "module-value"),
}


@pytest.mark.parametrize("case", sorted(REJECTED))
def test_guard_rejects(case: str) -> None:
    code, rule = REJECTED[case]
    assert rule in rules(code), guard(code)


def test_literal_source_findings_are_reported_at_the_call() -> None:
    code = "x = 1\n\nexec('import json\\nimport subprocess')\n"
    assert guard(code) == [
        "Line 3: Import of 'subprocess' is not allowed (in the source given to 'exec') [process]"
    ]


def test_import_and_use_are_both_reported() -> None:
    assert guard("import os as o\n\no.system('id')\n") == ["Line 3: Use of 'os.system' is not allowed [process]"]
    assert guard("from os import system as s\ns('id')\n") == [
        "Line 1: Import of 'os.system' is not allowed [process]",
        "Line 2: Use of 'os.system' is not allowed [process]",
    ]


def test_user_binding_shadows_a_builtin() -> None:
    assert guard("def eval(x):\n    return x\neval(y)\n") == []


def test_unparseable_code_passes_to_the_interpreter() -> None:
    assert guard("def main(:\n    import subprocess\n") == []
