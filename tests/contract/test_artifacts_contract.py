"""Contract: files saved under artifacts/ come back (allowed types only, at most 10)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from execbox.models import Status

if TYPE_CHECKING:
    from tests.conftest import SandboxRunner

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_matplotlib_png_is_an_artifact(executor: SandboxRunner) -> None:
    result = executor.run(
        """
        import matplotlib
        import matplotlib.pyplot as plt

        def main():
            fig, ax = plt.subplots(figsize=(3, 2))
            ax.plot([1, 2, 3], [1, 4, 9])
            fig.savefig("artifacts/plot.png")
            return matplotlib.get_backend()
        """
    )
    assert result.status is Status.SUCCESS, executor.describe(result)
    assert result.result is not None and result.result.value.lower() == "agg"
    assert [a.name for a in result.artifacts] == ["plot.png"]
    png = result.artifacts[0]
    assert png.mime_type == "image/png"
    assert png.content.startswith(PNG_MAGIC)
    assert png.size == len(png.content) > 1000


def test_csv_artifact_content_is_exact(executor: SandboxRunner) -> None:
    result = executor.run(
        """
        import pandas as pd

        def main():
            pd.DataFrame({"a": [1, 2], "b": ["x", "y"]}).to_csv("artifacts/table.csv", index=False)
        """
    )
    assert result.status is Status.SUCCESS, executor.describe(result)
    assert len(result.artifacts) == 1
    csv = result.artifacts[0]
    assert (csv.name, csv.mime_type) == ("table.csv", "text/csv")
    assert csv.content == b"a,b\n1,x\n2,y\n"
    assert csv.size == len(csv.content)
    assert csv.content_b64 == "YSxiCjEseAoyLHkK"


def test_disallowed_extensions_are_ignored(executor: SandboxRunner) -> None:
    result = executor.run(
        """
        def main():
            for name in ("run.sh", "notes.txt", "binary.exe", "noext", "data.json", "page.html"):
                with open(f"artifacts/{name}", "w") as fh:
                    fh.write("{}")
        """
    )
    assert result.status is Status.SUCCESS, executor.describe(result)
    assert {(a.name, a.mime_type) for a in result.artifacts} == {
        ("data.json", "application/json"),
        ("page.html", "text/html"),
    }


def test_more_than_ten_artifacts_are_capped_at_ten(executor: SandboxRunner) -> None:
    result = executor.run(
        """
        def main():
            for i in range(13):
                with open(f"artifacts/f{i:02d}.json", "w") as fh:
                    fh.write(str(i))
        """
    )
    assert result.status is Status.SUCCESS, executor.describe(result)
    assert len(result.artifacts) == 10
    assert [a.name for a in result.artifacts] == [f"f{i:02d}.json" for i in range(10)]
    assert [a.content for a in result.artifacts] == [str(i).encode() for i in range(10)]


def test_artifacts_of_a_failed_program_are_still_collected(executor: SandboxRunner) -> None:
    result = executor.run(
        """
        def main():
            with open("artifacts/partial.csv", "w") as fh:
                fh.write("a\\n1\\n")
            raise RuntimeError("after saving")
        """
    )
    assert result.status is Status.PROGRAM_ERROR, executor.describe(result)
    assert [(a.name, a.content) for a in result.artifacts] == [("partial.csv", b"a\n1\n")]


def test_nodejs_artifact(executor: SandboxRunner) -> None:
    result = executor.run(
        """
        const fs = require('fs');
        function main() {
          fs.writeFileSync('artifacts/out.json', JSON.stringify({ ok: true }));
          fs.writeFileSync('artifacts/image.svg', '<svg xmlns="http://www.w3.org/2000/svg"/>');
        }
        """,
        "nodejs",
    )
    assert result.status is Status.SUCCESS, executor.describe(result)
    assert [(a.name, a.mime_type, a.content) for a in result.artifacts] == [
        ("image.svg", "image/svg+xml", b'<svg xmlns="http://www.w3.org/2000/svg"/>'),
        ("out.json", "application/json", b'{"ok":true}'),
    ]


def test_no_artifacts_without_files(executor: SandboxRunner) -> None:
    result = executor.run("def main():\n    return 1\n")
    assert result.status is Status.SUCCESS, executor.describe(result)
    assert result.artifacts == ()
