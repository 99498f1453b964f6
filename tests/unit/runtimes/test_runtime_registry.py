"""The runtime registry is the one list of languages: the wire enum, the builders, the
installers and the static check's rule sets all agree with it."""

from __future__ import annotations

from pathlib import Path

import pytest

from execbox.errors import BadRequestError
from execbox.models import Language
from execbox.policy import INSPECTORS, inspect_code
from execbox.runtimes import (
    RUNTIMES,
    Runtime,
    find_runtime,
    get_runtime,
    language_names,
    runtime_for_file,
)
from execbox.service.environments import BUILDERS
from execbox.service.package_install import INSTALLERS
from execbox.service.packages import (
    PACKAGES_MOUNT,
    package_spec,
    parse_requirements,
    requirement_name,
)
from execbox.service.specs import sandbox_spec
from execbox.settings import CodeCheckMode, Settings


def test_every_language_has_a_runtime_and_every_runtime_a_language() -> None:
    assert set(RUNTIMES) == set(Language)
    assert all(language is runtime.language for language, runtime in RUNTIMES.items())
    assert language_names() == tuple(runtime.name for runtime in RUNTIMES.values())
    assert sorted(language_names()) == sorted(language.value for language in Language)


@pytest.mark.parametrize("runtime", RUNTIMES.values(), ids=lambda r: r.name)
def test_what_a_runtime_names_is_registered_in_its_layer(runtime: Runtime) -> None:
    assert runtime.builder in BUILDERS
    assert runtime.packages.installer in INSTALLERS
    assert runtime.inspector in INSPECTORS
    assert runtime.display_name and runtime.file_suffixes
    assert runtime.driver_path.is_file() and runtime.packages_file.is_file()


@pytest.mark.parametrize("runtime", RUNTIMES.values(), ids=lambda r: r.name)
def test_names_and_aliases_find_their_runtime_and_parse_on_the_wire(runtime: Runtime) -> None:
    for name in (runtime.name, *runtime.aliases):
        assert find_runtime(name) is runtime
        assert find_runtime(f" {name.upper()} ") is runtime
        assert Language(name) is runtime.language  # the wire accepts it too
        assert get_runtime(name) is runtime


def test_unknown_names_are_refused() -> None:
    assert find_runtime("ruby") is None
    assert find_runtime("") is None
    with pytest.raises(BadRequestError, match="use python or nodejs"):
        get_runtime("ruby")


@pytest.mark.parametrize(
    ("file_name", "language"),
    [("job.py", "python"), ("job.js", "nodejs"), ("job.mjs", "nodejs"), ("job.cjs", "nodejs"), ("job.txt", "python"),
     ("job.json", "python")],
)
def test_the_language_of_a_file_is_its_suffix_s(file_name: str, language: str) -> None:
    assert runtime_for_file(file_name).name == language


def test_the_check_uses_the_rule_set_the_runtime_names() -> None:
    for runtime in RUNTIMES.values():
        for mode in (CodeCheckMode.BLOCK, CodeCheckMode.GUARD):
            for code in ("import os", "require('fs')", "eval('1')"):
                expected = INSPECTORS[runtime.inspector](code, mode)
                assert inspect_code(code, runtime.name, mode) == expected
                assert all(inspect_code(code, alias, mode) == expected for alias in runtime.aliases)
    assert inspect_code("import os", "python") and inspect_code("require('fs')", "javascript")


def test_preload_applies_to_the_runtimes_that_declare_it(tmp_path: Path) -> None:
    settings = Settings.load(env_file=None, state_dir=tmp_path, python_preload="json")
    for runtime in RUNTIMES.values():
        spec = sandbox_spec(settings, runtime)
        assert spec.preload_modules == (("json",) if runtime.preload else ())
        assert dict(runtime.env).items() <= spec.env.items()


def test_package_grammar_per_runtime() -> None:
    assert parse_requirements(Language.PYTHON, ["Tabulate_X >= 0.8 , <1", "six"]) == ("six", "tabulate-x<1,>=0.8")
    assert parse_requirements(Language.NODEJS, ["is-number@7.0.0", "@scope/Name==1.2.3"]) == (
        "@scope/Name@1.2.3", "is-number@7.0.0")
    assert requirement_name(Language.PYTHON, "tabulate-x<1,>=0.8") == "tabulate-x"
    assert requirement_name(Language.NODEJS, "@scope/Name@1.2.3") == "@scope/name"
    with pytest.raises(BadRequestError, match="is not a PyPI name"):
        parse_requirements(Language.PYTHON, ["git+https://example.invalid/x"])
    with pytest.raises(BadRequestError, match="is not an npm name"):
        parse_requirements(Language.NODEJS, ["./local"])


def test_a_package_layer_is_on_the_import_path_the_runtime_declares(tmp_path: Path) -> None:
    settings = Settings.load(env_file=None, state_dir=tmp_path)
    python = package_spec(sandbox_spec(settings, RUNTIMES[Language.PYTHON]), tmp_path)
    assert python.env["PYTHONPATH"] == f"{PACKAGES_MOUNT}/python"
    assert "-I" not in python.runtime.argv_template and {"-s", "-P"} <= set(python.runtime.argv_template)
    node_spec = sandbox_spec(settings, RUNTIMES[Language.NODEJS])
    node = package_spec(node_spec, tmp_path)
    assert node.env["NODE_PATH"] == f"{PACKAGES_MOUNT}/node_modules:{node_spec.env['NODE_PATH']}"
    assert node.runtime == node_spec.runtime
