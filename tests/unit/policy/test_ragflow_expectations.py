"""block keeps RAGFlow's rules: the static-check side of RAGFlow's sandbox security suite.

RAGFlow's suite (sandbox/tests/sandbox_security_tests_full.py) posts programs to /run and
expects some to fail and some to succeed. These are its cases whose outcome the static
check decides, restated: what it expects refused must be refused under block, what it
expects to run must pass the check (the sandbox then decides the rest: the infinite
loops and the 300 MB allocation pass the check and are stopped by the limits).
"""

from __future__ import annotations

import pytest

from execbox.policy import inspect_code
from execbox.settings import CodeCheckMode

__all__: list[str] = []

REFUSED = {
    "dangerous import os": "import os\n\ndef main():\n    pass\n",
    "from subprocess import Popen": "from subprocess import Popen\n\ndef main():\n    pass\n",
    "eval call": "def main():\n    eval('os.system(\"echo hello\")')\n",
    "shutil.rmtree": "import shutil\n\ndef main():\n    shutil.rmtree('/some/path')\n",
    "concatenation fed to eval": (
        "def main():\n    dangerous_string = \"os.\" + \"system\"\n    eval(dangerous_string + '(\"echo hello\")')\n"
    ),
    "eval inside a user function": (
        "def eval_function():\n    eval('os.system(\"echo hello\")')\n\ndef main():\n    eval_function()\n"
    ),
}

PASSES = {
    ("python", "no dependencies"): "def main():\n    return {\"data\": \"hello, world\"}\n",
    ("python", "pandas"): (
        "import pandas as pd\n\ndef main():\n    data = {'Name': ['Alice', 'Bob'], 'Age': [25, 30]}\n"
        "    df = pd.DataFrame(data)\n"
    ),
    ("python", "infinite loop"): "def main():\n    while True:\n        pass\n",
    ("python", "memory"): "def main():\n    x = ['a' * 1024 * 1024] * 300\n",
    ("nodejs", "https"): (
        "const https = require('https');\n\nasync function main(args) {\n  return new Promise((resolve, reject) => {\n"
        "    const req = https.get('https://example.com/', (res) => {\n      let data = '';\n"
        "      res.on('data', (chunk) => { data += chunk; });\n      res.on('end', () => resolve(data));\n"
        "    });\n    req.on('error', (err) => reject(err));\n  });\n}\n\nmodule.exports = { main };\n"
    ),
    ("nodejs", "axios"): (
        "const axios = require('axios');\n\nasync function main(args) {\n  try {\n"
        "    const response = await axios.get('https://example.com/', { timeout: 10000 });\n"
        "    console.log('Body:', response.data);\n  } catch (error) {\n    console.error('Error:', error.message);\n"
        "  }\n}\n\nmodule.exports = { main };\n"
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_what_ragflow_expects_refused_is_refused_under_block(case: str) -> None:
    assert inspect_code(REFUSED[case], "python", CodeCheckMode.BLOCK)


@pytest.mark.parametrize("mode", [CodeCheckMode.BLOCK, CodeCheckMode.GUARD])
@pytest.mark.parametrize(("language", "case"), sorted(PASSES))
def test_what_ragflow_expects_to_run_passes_the_check(language: str, case: str, mode: CodeCheckMode) -> None:
    assert inspect_code(PASSES[(language, case)], language, mode) == []
