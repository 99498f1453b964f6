"""Settings: RAGFlow's SANDBOX_* names and defaults, duration and size forms, clear errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from execbox.errors import ConfigurationError
from execbox.settings import Settings, parse_duration_s, parse_rate, parse_size_bytes


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No SANDBOX_* variable and no .env from the caller's environment."""
    for name in list(os.environ):
        if name.upper().startswith("SANDBOX_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def test_ragflow_defaults() -> None:
    settings = Settings.load()
    assert settings.executor_manager_port == 9385
    assert settings.executor_manager_pool_size == 5
    assert settings.timeout == 10.0
    assert settings.max_memory == 256 * 1024 * 1024
    assert settings.enable_seccomp is False
    assert settings.base_python_image == "sandbox-base-python:latest"
    assert settings.base_nodejs_image == "sandbox-base-nodejs:latest"


def test_secure_defaults() -> None:
    settings = Settings.load()
    assert settings.enable_network is False
    assert settings.code_check.value == "block"
    assert settings.uid_base >= 1000


@pytest.mark.parametrize("mode", ["block", "guard", "warn", "off"])
def test_code_check_modes(monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    monkeypatch.setenv("SANDBOX_CODE_CHECK", mode)
    assert Settings.load().code_check.value == mode


def test_unknown_code_check_mode_names_the_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANDBOX_CODE_CHECK", "gaurd")
    with pytest.raises(ConfigurationError, match="SANDBOX_CODE_CHECK='gaurd'.*'guard'"):
        Settings.load()


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("500ms", 0.5), ("10s", 10.0), ("2m", 120.0), ("1m30s", 90.0), ("1h", 3600.0), ("1.5s", 1.5), ("7", 7.0),
     (" 10s ", 10.0), ("10S", 10.0), (3, 3.0), (0.25, 0.25)],
)
def test_duration_forms(text: object, seconds: float) -> None:
    assert parse_duration_s(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "abc", "10x", "1m30", "s10", "-1s", "0s", "0", "10 s x", "1e3s", "ms"])
def test_malformed_durations_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration_s(text)


@pytest.mark.parametrize(
    ("text", "size"),
    [("512b", 512), ("1k", 1024), ("256m", 256 << 20), ("1g", 1 << 30), ("256M", 256 << 20), ("2G", 2 << 30),
     ("64mb", 64 << 20), ("64mib", 64 << 20), ("4096", 4096), (1024, 1024), ("1.5k", 1536)],
)
def test_size_forms(text: object, size: int) -> None:
    assert parse_size_bytes(text) == size


@pytest.mark.parametrize("text", ["", "abc", "12x", "m", "-1m", "0", "0k", "1t", "10 mb x"])
def test_malformed_sizes_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_size_bytes(text)


def test_environment_variables_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANDBOX_TIMEOUT", "1m30s")
    monkeypatch.setenv("SANDBOX_MAX_MEMORY", "512m")
    monkeypatch.setenv("SANDBOX_EXECUTOR_MANAGER_PORT", "9999")
    monkeypatch.setenv("SANDBOX_EXECUTOR_MANAGER_POOL_SIZE", "2")
    monkeypatch.setenv("SANDBOX_ENABLE_SECCOMP", "true")
    settings = Settings.load()
    assert settings.timeout == 90.0
    assert settings.max_memory == 512 << 20
    assert settings.executor_manager_port == 9999
    assert settings.executor_manager_pool_size == 2
    assert settings.enable_seccomp is True
    limits = settings.default_limits()
    assert limits.wall_time_s == 90.0
    assert limits.memory_bytes == 512 << 20


def test_dotenv_file_is_read(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("SANDBOX_TIMEOUT=500ms\nSANDBOX_MAX_MEMORY=1g\n")
    settings = Settings.load()
    assert settings.timeout == 0.5
    assert settings.max_memory == 1 << 30


@pytest.mark.parametrize(
    ("variable", "value", "form"),
    [
        ("SANDBOX_TIMEOUT", "ten seconds", "500ms"),
        ("SANDBOX_TIMEOUT", "1m30", "1m30s"),
        ("SANDBOX_MAX_MEMORY", "lots", "256m"),
        ("SANDBOX_MAX_MEMORY", "12x", "b, k, m, g"),
        ("SANDBOX_POOL_WAIT", "soon", "duration"),
    ],
)
def test_malformed_value_names_variable_value_and_form(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, form: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigurationError) as caught:
        Settings.load()
    message = str(caught.value)
    assert variable in message
    assert value in message
    assert form in message


def test_malformed_override_names_the_variable() -> None:
    with pytest.raises(ConfigurationError, match="SANDBOX_TIMEOUT") as caught:
        Settings.load(timeout="abc")
    assert "'abc'" in str(caught.value)


def test_out_of_range_port_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANDBOX_EXECUTOR_MANAGER_PORT", "70000")
    with pytest.raises(ConfigurationError, match="SANDBOX_EXECUTOR_MANAGER_PORT"):
        Settings.load()


def test_several_bad_values_are_all_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANDBOX_TIMEOUT", "x")
    monkeypatch.setenv("SANDBOX_MAX_MEMORY", "y")
    with pytest.raises(ConfigurationError) as caught:
        Settings.load()
    assert "SANDBOX_TIMEOUT" in str(caught.value)
    assert "SANDBOX_MAX_MEMORY" in str(caught.value)


@pytest.mark.parametrize(
    ("text", "rate"), [("", None), ("off", None), ("100/minute", (100, 60.0)), ("10/second", (10, 1.0)), ("5/h", (5, 3600.0))]
)
def test_rate_forms(text: str, rate: tuple[int, float] | None) -> None:
    assert parse_rate(text) == rate


def test_malformed_rate_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANDBOX_RATE_LIMIT", "lots/day")
    with pytest.raises(ConfigurationError, match="SANDBOX_RATE_LIMIT"):
        Settings.load()


def test_settings_are_frozen() -> None:
    settings = Settings.load()
    with pytest.raises(Exception):  # noqa: B017,PT011 - pydantic's frozen-instance error
        settings.timeout = 1.0  # type: ignore[misc]


def test_the_setting_is_checked_at_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANDBOX_EGRESS_ALLOW", "api.github.com,a.*.com")
    with pytest.raises(ConfigurationError, match=r"SANDBOX_EGRESS_ALLOW=.*a\.\*\.com.*'\*' may only be"):
        Settings.load()


def test_no_allowlist_is_no_network_and_enable_network_is_any_public_host(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    assert Settings.load().egress_rules == ()
    monkeypatch.setenv("SANDBOX_EGRESS_ALLOW", "api.github.com:443, 10.0.0.0/8")
    assert [str(r) for r in Settings.load().egress_rules] == ["api.github.com:443", "10.0.0.0/8"]
    monkeypatch.setenv("SANDBOX_ENABLE_NETWORK", "true")
    assert [str(r) for r in Settings.load().egress_rules] == ["api.github.com:443", "10.0.0.0/8", "*"]
    monkeypatch.delenv("SANDBOX_EGRESS_ALLOW")
    assert [str(r) for r in Settings.load().egress_rules] == ["*"]
