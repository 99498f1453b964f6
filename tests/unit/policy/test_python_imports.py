"""Which Python code the executor sends to the light pool (no preloaded modules)."""

from __future__ import annotations

import pytest

from execbox.policy import imports_only_stdlib


@pytest.mark.parametrize(
    "code",
    [
        "def main():\n    return 'hello'\n",
        "import json, os.path\nfrom collections import abc\n",
        "from __future__ import annotations\nimport typing\n",
        "import re\ndef main():\n    return re.compile('x').pattern\n",  # re.compile is not compile()
        "def main():\n    import csv, io\n    return 1\n",  # imports inside functions are read too
        "def main(:\n",  # does not parse: it fails the same way anywhere
        "import math as m\nfrom os import path as p\n",
    ],
)
def test_standard_library_only(code: str) -> None:
    assert imports_only_stdlib(code)


@pytest.mark.parametrize(
    "code",
    [
        "import pandas as pd\n",
        "import json\nimport numpy\n",
        "from matplotlib import pyplot\n",
        "def main():\n    import requests\n",
        "import os, scipy.stats\n",
        "from . import helper\n",  # relative: not the standard library
        "__import__('pandas')\n",
        "import importlib\nimportlib.import_module('numpy')\n",
        "from importlib import import_module\n",
        "import runpy\n",
        "exec('import numpy')\n",
        "eval(\"__import__('numpy')\")\n",
        "import builtins\nbuiltins.__import__('numpy')\n",
        "compile('import numpy', 'x', 'exec')\n",
    ],
)
def test_third_party_or_dynamic_imports(code: str) -> None:
    assert not imports_only_stdlib(code)
