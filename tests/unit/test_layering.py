"""Imports point down only (docs/architecture.md): import-linter's contract, plus a grimp check.

``lint-imports`` runs the ``layers`` contract of pyproject.toml. The check is shown able
to fail on a throw-away package that breaks its own layers, and the contract itself is
checked to still say what the architecture says.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")

#: (importer, imported): neither may import the other's package, directly or not
FORBIDDEN = [
    ("execbox.isolation", "execbox.pool"),
    ("execbox.isolation", "execbox.service"),
    ("execbox.isolation", "execbox.api"),
    ("execbox.isolation", "execbox.policy"),
    ("execbox.runtimes", "execbox.isolation"),
    ("execbox.pool", "execbox.service"),
    ("execbox.policy", "execbox.service"),
    ("execbox.policy", "execbox.isolation"),
    ("execbox.service", "execbox.api"),
    ("execbox.models", "execbox.settings"),
    ("execbox.errors", "execbox.models"),
    ("execbox.settings", "execbox.isolation"),
]
#: policy is pure: static inspection does no I/O
POLICY_FORBIDDEN_MODULES = ("os", "subprocess", "socket", "pathlib", "shutil", "io", "tempfile", "httpx")


def _lint_imports(cwd: Path, config: Path | None = None, pythonpath: Path | None = None) -> subprocess.CompletedProcess[str]:
    if not LINT_IMPORTS.exists():
        pytest.fail(f"{LINT_IMPORTS} is missing: install the dev extra (pip install -e .[dev])")
    env = {**os.environ}
    if pythonpath is not None:
        env["PYTHONPATH"] = f"{pythonpath}{os.pathsep}{env.get('PYTHONPATH', '')}"
    argv = [str(LINT_IMPORTS), "--no-cache"] + (["--config", str(config)] if config else [])
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False)


def test_import_linter_contracts_are_kept() -> None:
    run = _lint_imports(ROOT)
    assert run.returncode == 0, f"import contract broken:\n{run.stdout}\n{run.stderr}"
    assert "BROKEN" not in run.stdout
    assert "0 broken" in run.stdout


def test_the_layers_contract_says_what_the_architecture_says() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    assert config["root_package"] == "execbox"
    layers_contracts = [c for c in config["contracts"] if c["type"] == "layers"]
    assert layers_contracts, "no layers contract in pyproject.toml"
    layers = [layer.replace(" ", "") for layer in layers_contracts[0]["layers"]]

    def position(module: str) -> int:
        return next(i for i, layer in enumerate(layers) if module in layer.split("|"))

    order = ["execbox.api", "execbox.service", "execbox.pool", "execbox.isolation", "execbox.runtimes",
             "execbox.settings", "execbox.models"]
    positions = [position(m) for m in order]
    assert positions == sorted(positions), f"layers out of order: {layers}"
    assert position("execbox.policy") < position("execbox.isolation")
    assert position("execbox.artifacts") < position("execbox.isolation")
    assert position("execbox.errors") == position("execbox.models")


def test_lint_imports_catches_a_violation(tmp_path: Path) -> None:
    package = tmp_path / "layered"
    (package / "high").mkdir(parents=True)
    (package / "low").mkdir()
    (package / "__init__.py").write_text("")
    (package / "high" / "__init__.py").write_text("")
    (package / "low" / "__init__.py").write_text("")
    (package / "low" / "sneaky.py").write_text("from layered.high import thing  # points up\n")
    (package / "high" / "thing.py").write_text("X = 1\n")
    config = tmp_path / "importlinter.ini"
    config.write_text(
        textwrap.dedent(
            """
            [importlinter]
            root_package = layered

            [importlinter:contract:layers]
            name = layers point down only
            type = layers
            layers =
                layered.high
                layered.low
            """
        )
    )
    run = _lint_imports(tmp_path, config=config, pythonpath=tmp_path)
    assert run.returncode != 0, run.stdout
    assert "BROKEN" in run.stdout
    assert "layered.low.sneaky" in run.stdout


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph("execbox", include_external_packages=True, cache_dir=None)


@pytest.mark.parametrize(("importer", "imported"), FORBIDDEN)
def test_no_import_points_up(graph: grimp.ImportGraph, importer: str, imported: str) -> None:
    if importer not in graph.modules or imported not in graph.modules:
        pytest.fail(f"{importer} or {imported} is not a module of execbox any more: update this test")
    chains = graph.find_shortest_chains(importer=importer, imported=imported, as_packages=True)
    assert not chains, f"{importer} reaches {imported} via {sorted(chains)}"


def test_policy_does_no_io(graph: grimp.ImportGraph) -> None:
    policy_modules = {m for m in graph.modules if m == "execbox.policy" or m.startswith("execbox.policy.")}
    assert policy_modules
    offenders = {
        (module, imported)
        for module in policy_modules
        for imported in graph.find_modules_directly_imported_by(module)
        if imported.split(".")[0] in POLICY_FORBIDDEN_MODULES
    }
    assert not offenders


def test_grimp_sees_the_package(graph: grimp.ImportGraph) -> None:
    # the graph is real: the executor does reach the pool and the isolation interface
    assert graph.find_shortest_chain(importer="execbox.service.executor", imported="execbox.pool.pool")
    assert graph.find_shortest_chain(importer="execbox.service.executor", imported="execbox.isolation.base")
    # and it lists the standard library, so test_policy_does_no_io can see an `import os`
    assert "os" in graph.find_modules_directly_imported_by("execbox.artifacts")
