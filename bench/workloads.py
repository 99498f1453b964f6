"""The three workloads of the benchmark: what is sent to ``POST /run`` and what counts as right."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any

__all__ = ["TARGETS_MS", "WORKLOADS", "Workload"]


@dataclass(frozen=True)
class Workload:
    name: str
    #: the runtime whose sandboxes serve it (for the in-process sandbox cost)
    language: str
    code: str
    #: what ``result.value`` must be when the service reports a result (execbox does; others may not)
    expected: Any
    arguments: dict[str, Any] = field(default_factory=dict)

    def body(self) -> bytes:
        """The JSON body of ``POST /run``, encoded once (the load generator must stay cheap)."""
        payload = {
            "code_b64": base64.b64encode(self.code.encode()).decode(),
            "language": self.language,
            "arguments": self.arguments,
        }
        return json.dumps(payload).encode()


PYTHON_HELLO = Workload(
    name="python-hello",
    language="python",
    code='def main():\n    return "hello"\n',
    expected="hello",
)

PYTHON_PANDAS = Workload(
    name="python-pandas",
    language="python",
    code=(
        "import pandas as pd\n"
        "\n"
        "\n"
        "def main():\n"
        '    df = pd.DataFrame({"x": [1, 2, 3, 4], "y": [0.5, 1.5, 2.5, 3.5]})\n'
        '    df["z"] = df["x"] * df["y"]\n'
        '    return {"rows": int(len(df)), "z_sum": float(df["z"].sum())}\n'
    ),
    expected={"rows": 4, "z_sum": 25.0},
)

NODE_HELLO = Workload(
    name="node-hello",
    language="nodejs",
    code='function main(args) {\n  return "hello";\n}\n\nmodule.exports = { main };\n',
    expected="hello",
)

WORKLOADS: dict[str, Workload] = {w.name: w for w in (PYTHON_HELLO, PYTHON_PANDAS, NODE_HELLO)}

#: issue 5's targets (p50 over HTTP, ms), drawn on the chart; never asserted
TARGETS_MS: dict[str, dict[str, float]] = {
    "namespaces": {"python-hello": 5, "python-pandas": 8, "node-hello": 8},
    "gvisor": {"python-hello": 25, "python-pandas": 30, "node-hello": 30},
}
#: issue 5's throughput targets (successful executions per second, 8 clients)
TARGET_THROUGHPUT = {"namespaces": 150, "gvisor": 40}
