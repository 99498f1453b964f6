"""A new user's rough edges (issue 9, finding 8): missing runtimes stop start-up with the
command that builds them, `execbox build` says what it installs, `execbox --version` and
`--env-file` exist, and a typo in a setting is named at start-up."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from execbox import __version__
from execbox.cli import app
from execbox.errors import ConfigurationError, RuntimeEnvironmentError
from execbox.isolation.base import IsolationBackend, Sandbox, SandboxSpec
from execbox.runtimes.nodejs import NODEJS
from execbox.service import environments
from execbox.service.executor import Executor
from execbox.settings import Settings


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.upper().startswith("SANDBOX_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


class NoSandboxes(IsolationBackend):
    """Never builds anything: start-up must stop before a sandbox is asked for."""

    name = "no-sandboxes-test-backend"

    def check(self) -> None:
        pass

    def create(self, spec: SandboxSpec) -> Sandbox:
        raise AssertionError("no sandbox should be built")

    def reap(self) -> int:
        return 0


def test_an_empty_state_directory_stops_start_up_with_the_build_command(tmp_path: Path) -> None:
    settings = Settings.load(env_file=None, state_dir=tmp_path / "state")
    executor = Executor(settings, backend=NoSandboxes(), pool_size=1)
    with pytest.raises(RuntimeEnvironmentError, match="execbox build") as caught:
        asyncio.run(executor.start())
    assert str(settings.runtime_dir) in str(caught.value)
    asyncio.run(executor.close())


def test_one_missing_runtime_stops_start_up_naming_the_build_command(tmp_path: Path) -> None:
    state = tmp_path / "state"
    (state / "runtimes" / "python").mkdir(parents=True)
    settings = Settings.load(env_file=None, state_dir=state)
    executor = Executor(settings, backend=NoSandboxes(), pool_size=0)
    with pytest.raises(RuntimeEnvironmentError, match=r"nodejs runtime environment is missing.*execbox build.*SANDBOX_LANGUAGES=python"):
        asyncio.run(executor.start())
    asyncio.run(executor.close())


def test_serving_only_the_built_languages_starts(tmp_path: Path) -> None:
    state = tmp_path / "state"
    (state / "runtimes" / "python").mkdir(parents=True)
    settings = Settings.load(env_file=None, state_dir=state, languages="python")
    executor = Executor(settings, backend=NoSandboxes(), pool_size=0)
    asyncio.run(executor.start())
    try:
        assert {s.name.split("/")[0] for s in executor.pool_stats()} == {"python"}
    finally:
        asyncio.run(executor.close())


def test_languages_setting_is_checked() -> None:
    with pytest.raises(ConfigurationError, match="SANDBOX_LANGUAGES"):
        Settings.load(env_file=None, languages="python,cobol")


def test_build_says_what_it_installs_and_how_far_it_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    commands: list[list[str]] = []

    def fake_run(argv: list[str], what: str, **kwargs: Any) -> None:
        commands.append(argv)
        if "venv" in argv:
            Path(argv[-1]).mkdir(parents=True)

    monkeypatch.setattr(environments, "_run", fake_run)
    monkeypatch.setattr(environments.shutil, "which", lambda name: "/usr/bin/npm")
    lines: list[str] = []
    built = environments.build_all(tmp_path / "runtimes", force=True, progress=lines.append)
    assert built == {"python": True, "nodejs": True}
    text = "\n".join(lines)
    assert "building runtime 1 of 2: python" in text
    assert "building runtime 2 of 2: nodejs" in text
    assert "python: [2/4] pip install of 4 packages: numpy==" in text
    npm_packages = sorted(json.loads(NODEJS.packages_file.read_text())["dependencies"])
    assert f"nodejs: [1/1] npm install of {len(npm_packages)} packages: {', '.join(npm_packages)}" in text
    assert "python: built in" in text
    pip = next(argv for argv in commands if "install" in argv and "-r" in argv)
    assert "--quiet" not in pip  # pip's own lines (each package collected, installed) are shown


def test_version() -> None:
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"execbox {__version__}"


def test_env_file_is_read_and_typos_are_named(tmp_path: Path) -> None:
    env_file = tmp_path / "custom.env"
    env_file.write_text("SANDBOX_MAX_MEMORY=1\n")
    result = CliRunner().invoke(app, ["--env-file", str(env_file), "doctor"])
    assert result.exit_code == 2
    assert "SANDBOX_MAX_MEMORY" in result.output and "16m" in result.output
    env_file.write_text(f"SANDBOX_TIMOUT=5s\nSANDBOX_STATE_DIR={tmp_path / 'state'}\n")
    result = CliRunner().invoke(app, ["--env-file", str(env_file), "doctor"])
    assert "unknown setting SANDBOX_TIMOUT" in result.output
    assert "did you mean SANDBOX_TIMEOUT?" in result.output
    assert str(tmp_path / "state") in result.output  # the file's settings were used


def test_serve_without_runtimes_stops_with_the_build_command(tmp_path: Path) -> None:
    env_file = tmp_path / "empty.env"
    env_file.write_text(f"SANDBOX_STATE_DIR={tmp_path / 'empty-state'}\n")
    result = CliRunner().invoke(app, ["--env-file", str(env_file), "serve", "--port", "1"])
    assert result.exit_code == 1
    assert "execbox build" in result.output
    assert "Traceback" not in result.output
