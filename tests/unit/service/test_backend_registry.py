"""The backend registry is the one list of backends: settings, auto, the doctor and the
test suites read it."""

from __future__ import annotations

from pathlib import Path

import pytest

from execbox.errors import BackendUnavailableError, ConfigurationError
from execbox.isolation.base import IsolationBackend
from execbox.service import backends
from execbox.service.backends import (
    AUTO_ORDER,
    BACKEND_NAMES,
    BACKENDS,
    BackendEntry,
    build_backend,
    select_backend,
)
from execbox.settings import BackendChoice, Settings


def test_sandbox_backend_choices_are_auto_and_the_settable_backends() -> None:
    assert [choice.value for choice in BackendChoice] == ["auto", *BACKEND_NAMES]
    assert BACKEND_NAMES == tuple(entry.name for entry in BACKENDS if entry.from_settings)
    assert "unisolated-test" in {entry.name for entry in BACKENDS}
    assert "unisolated-test" not in BACKEND_NAMES and "unisolated-test" not in AUTO_ORDER
    assert AUTO_ORDER == ("gvisor", "namespaces")


def test_each_entry_builds_its_backend(tmp_path: Path) -> None:
    settings = Settings.load(env_file=None, state_dir=tmp_path)
    for name in BACKEND_NAMES:
        try:
            backend = build_backend(name, settings)
        except BackendUnavailableError as exc:
            pytest.skip(f"{name} cannot be built here: {exc}")
        assert backend.name == name


def test_unknown_names_are_refused_with_the_choices(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="use auto, gvisor or namespaces"):
        build_backend("docker", Settings.load(env_file=None, state_dir=tmp_path))


class _Fake(IsolationBackend):
    name = "fake"

    def __init__(self, name: str, works: bool) -> None:
        self.name = name  # type: ignore[misc]
        self.works = works

    def check(self) -> None:
        if not self.works:
            raise BackendUnavailableError(f"{self.name} does not work here")

    def create(self, spec):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def reap(self) -> int:
        return 0


def test_auto_takes_the_first_entry_that_works_in_registry_order(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    entries = (
        BackendEntry(name="first", build=lambda s: _Fake("first", works=False)),
        BackendEntry(name="manual", build=lambda s: _Fake("manual", works=True), auto=False),
        BackendEntry(name="second", build=lambda s: _Fake("second", works=True)),
    )
    monkeypatch.setattr(backends, "_BY_NAME", {entry.name: entry for entry in entries})
    monkeypatch.setattr(backends, "AUTO_ORDER", tuple(entry.name for entry in entries if entry.auto))
    backend, warnings = select_backend(Settings.load(env_file=None, state_dir=tmp_path, backend="auto"))
    assert backend.name == "second"
    assert warnings == ["first backend unavailable: first does not work here"]
