"""Settings outside a sane range stop start-up, and unknown SANDBOX_* variables are named
with the closest known one (issue 9, finding 8)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from execbox.errors import ConfigurationError
from execbox.settings import Settings, unknown_variables


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.upper().startswith("SANDBOX_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        ("SANDBOX_MAX_MEMORY", "1", "16m"),
        ("SANDBOX_MAX_MEMORY", "4k", "16m"),
        ("SANDBOX_MAX_OUTPUT", "10", "1k"),
        ("SANDBOX_MAX_DISK", "1k", "1m"),
        ("SANDBOX_MAX_CODE_SIZE", "1g", "32m"),
        ("SANDBOX_TIMEOUT", "1ms", "0.01s"),
        ("SANDBOX_TIMEOUT", "100h", "86400s"),
        ("SANDBOX_POOL_WAIT", "2h", "3600s"),
        ("SANDBOX_BODY_TIMEOUT", "1ms", "0.1s"),
        ("SANDBOX_UID_BASE", "4294967000", "SANDBOX_UID_COUNT"),
    ],
)
def test_values_outside_the_sane_range_stop_start_up(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, says: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigurationError) as caught:
        Settings.load()
    assert variable in str(caught.value)
    assert says in str(caught.value)


def test_the_edges_of_the_ranges_are_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings.load(max_memory="16m", max_output="1k", timeout="10ms", body_timeout="1s")
    assert settings.max_memory == 16 << 20
    assert settings.body_timeout == 1.0


def test_a_typo_is_named_with_the_closest_setting(tmp_path: Path) -> None:
    env_file = tmp_path / "custom.env"
    env_file.write_text("SANDBOX_MAX_MEMROY=512m\nSANDBOX_TIMEOUT=5s\n")
    warnings = unknown_variables({"SANDBOX_TIMOUT": "5s", "SANDBOX_HOST": "ragflow", "PATH": "/bin"}, env_file)
    assert any("SANDBOX_TIMOUT" in w and "did you mean SANDBOX_TIMEOUT?" in w and "environment" in w for w in warnings)
    assert any("SANDBOX_MAX_MEMROY" in w and "SANDBOX_MAX_MEMORY" in w and "custom.env" in w for w in warnings)
    assert len(warnings) == 2  # SANDBOX_HOST is RAGFlow's own; known names and others are quiet


def test_env_file_is_read_and_a_missing_one_is_an_error(tmp_path: Path) -> None:
    env_file = tmp_path / "other.env"
    env_file.write_text("SANDBOX_TIMEOUT=7s\n")
    assert Settings.load(env_file=env_file).timeout == 7.0
    with pytest.raises(ConfigurationError, match="does not exist"):
        Settings.load(env_file=tmp_path / "missing.env")
