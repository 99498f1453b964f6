"""docs/code-check.md is true: every example marked in it gets the verdict it claims."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from execbox.policy import inspect_code
from execbox.settings import CodeCheckMode

__all__: list[str] = []

DOC = Path(__file__).resolve().parents[3] / "docs" / "code-check.md"
EXAMPLE = re.compile(
    r"<!-- example: (?P<language>\w+) block=(?P<block>pass|reject) guard=(?P<guard>pass|reject) -->\n"
    r"```\w+\n(?P<code>.*?)```",
    re.DOTALL,
)
EXAMPLES = list(EXAMPLE.finditer(DOC.read_text()))


def test_the_doc_has_examples_of_each_verdict() -> None:
    verdicts = {(m["block"], m["guard"]) for m in EXAMPLES}
    assert {("reject", "pass"), ("reject", "reject"), ("pass", "pass")} <= verdicts
    assert {m["language"] for m in EXAMPLES} == {"python", "nodejs"}


@pytest.mark.parametrize("mode", [CodeCheckMode.BLOCK, CodeCheckMode.GUARD])
@pytest.mark.parametrize("index", range(len(EXAMPLES)))
def test_example_gets_the_documented_verdict(index: int, mode: CodeCheckMode) -> None:
    example = EXAMPLES[index]
    found = inspect_code(example["code"], example["language"], mode)
    assert (found == []) is (example[mode.value] == "pass"), [str(f) for f in found]
