"""The unisolated test backend is refused unless a test asks for it by name, in code."""

from __future__ import annotations

import pytest

from execbox.errors import ConfigurationError
from execbox.isolation.unisolated import UNISOLATED_TEST_BACKEND, UnisolatedTestBackend
from execbox.service.backends import BACKEND_NAMES, build_backend
from execbox.settings import Settings


def test_it_is_refused_without_the_acknowledgement() -> None:
    with pytest.raises(ConfigurationError, match="isolates nothing"):
        UnisolatedTestBackend()
    with pytest.raises(ConfigurationError, match="isolates nothing"):
        UnisolatedTestBackend(i_know_this_is_not_isolated="yes")  # type: ignore[arg-type]


def test_auto_and_settings_never_choose_it() -> None:
    assert UNISOLATED_TEST_BACKEND not in BACKEND_NAMES
    with pytest.raises(ConfigurationError, match="isolates nothing"):
        build_backend(UNISOLATED_TEST_BACKEND, Settings.load(env_file=None))
    with pytest.raises(ConfigurationError, match="SANDBOX_BACKEND"):
        Settings.load(env_file=None, backend=UNISOLATED_TEST_BACKEND)


def test_it_says_what_it_is() -> None:
    backend = UnisolatedTestBackend(i_know_this_is_not_isolated=True)
    assert backend.name == "unisolated-test"
    assert "none" in backend.describe()["isolation"]
