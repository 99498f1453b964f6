"""API keys: parsing the file and the environment, lookup, reload, and the ``execbox keys`` commands."""

from __future__ import annotations

import hmac
import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

from execbox.cli import app
from execbox.errors import ConfigurationError
from execbox.service import apikeys
from execbox.service.apikeys import KeyStore, add_key, key_names, revoke_key
from execbox.settings import Settings

ALICE = "alice-key-0123456789abcdef"
BOB = "bob-key-0123456789abcdefgh"


pytestmark = pytest.mark.usefixtures("clean_settings_environment")


@pytest.fixture
def reload_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(apikeys, "RELOAD_CHECK_S", 0.0)


def keys_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "keys"
    path.write_text(text)
    path.chmod(0o600)
    return path


def test_file_with_comments_and_blank_lines(tmp_path: Path) -> None:
    path = keys_file(tmp_path, f"# the team's keys\n\nalice:{ALICE}\n  # indented comment\n bob : {BOB} \n")
    store = KeyStore(path)
    assert store.lookup(ALICE) == "alice"
    assert store.lookup(BOB) == "bob"
    assert store.names() == ["alice", "bob"]


@pytest.mark.parametrize("presented", [None, "", "wrong", ALICE[:-1], ALICE + "x", ALICE[:-1] + "g", "X" + ALICE[1:],
                                       f"alice:{ALICE}", ALICE.upper()])
def test_wrong_keys_are_no_one(tmp_path: Path, presented: str | None) -> None:
    store = KeyStore(keys_file(tmp_path, f"alice:{ALICE}\n"))
    assert store.lookup(presented) is None


def test_every_key_is_compared_whichever_matches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No early exit: the first key matching costs as many comparisons as none matching."""
    store = KeyStore(keys_file(tmp_path, f"alice:{ALICE}\nbob:{BOB}\ncarol:carol-key-0123456789abcdef\n"))
    calls: list[int] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append(len(a))
        return real(a, b)

    monkeypatch.setattr(apikeys.hmac, "compare_digest", counting)
    for presented, expected in ((ALICE, "alice"), ("nobody-0123456789abcdef", None), ("x", None)):
        calls.clear()
        assert store.lookup(presented) == expected
        assert calls == [32, 32, 32]  # digests: the same length whatever was presented


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("alice:" + ALICE + "\nno colon here\n", "line 2 is not name:key"),
        ("alice:\n", "line 1 gives 'alice' an empty key"),
        (":" + ALICE + "\n", "line 1 has a name that is not"),
        ("al ice:" + ALICE + "\n", "line 1 has a name that is not"),
        ("alice:tiny7key\n", "line 1 gives 'alice' a key shorter than 16"),
        ("alice:" + ALICE[:5] + " " + ALICE[5:] + "\n", "line 1 gives 'alice' a key with spaces"),
        ("alice:" + ALICE + "\n# x\nalice:" + BOB + "\n", "line 3 names 'alice' a second time"),
        ("alice:" + ALICE + "\nbob:" + ALICE + "\n", "line 2 gives 'bob' the key of 'alice'"),
    ],
)
def test_a_malformed_file_names_the_setting_and_the_line_never_the_key(tmp_path: Path, text: str, problem: str) -> None:
    path = keys_file(tmp_path, text)
    with pytest.raises(ConfigurationError) as caught:
        KeyStore(path)
    message = str(caught.value)
    assert message.startswith(f"SANDBOX_API_KEYS_FILE={str(path)!r}: "), message
    assert problem in message, message
    for secret in (ALICE, BOB, ALICE[6:], ALICE[5:], "tiny7key"):
        assert secret not in message


def test_a_missing_file_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"SANDBOX_API_KEYS_FILE=.* does not exist: create it with `execbox keys add"):
        KeyStore(tmp_path / "absent")


def test_keys_from_the_environment_and_the_file_together(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = keys_file(tmp_path, f"alice:{ALICE}\n")
    monkeypatch.setenv("SANDBOX_API_KEYS_FILE", str(path))
    monkeypatch.setenv("SANDBOX_API_KEYS", f" bob:{BOB} ,")
    settings = Settings.load()
    assert settings.keys_enabled
    assert BOB not in repr(settings)  # a secret setting
    store = KeyStore.from_settings(settings)
    assert store is not None
    assert (store.lookup(ALICE), store.lookup(BOB)) == ("alice", "bob")


def test_keys_are_off_without_either_setting() -> None:
    settings = Settings.load()
    assert not settings.keys_enabled
    assert KeyStore.from_settings(settings) is None


@pytest.mark.parametrize(
    ("inline", "problem"),
    [("alice", "SANDBOX_API_KEYS: entry 1 is not name:key"),
     (f"alice:{ALICE},alice:{BOB}", "SANDBOX_API_KEYS: entry 2 names 'alice' a second time")],
)
def test_malformed_inline_keys(inline: str, problem: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        KeyStore(None, inline)
    assert problem in str(caught.value)
    assert BOB not in str(caught.value)


def test_a_name_in_both_sources_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="both name alice"):
        KeyStore(keys_file(tmp_path, f"alice:{ALICE}\n"), f"alice:{BOB}")


def test_the_file_is_read_again_when_it_changes(tmp_path: Path, reload_at_once: None) -> None:
    path = keys_file(tmp_path, f"alice:{ALICE}\n")
    store = KeyStore(path)
    carol = add_key(path, "carol")
    assert store.lookup(carol) == "carol"
    assert revoke_key(path, "alice")
    assert store.lookup(ALICE) is None
    assert store.names() == ["carol"]


def test_a_file_made_malformed_keeps_the_previous_keys(tmp_path: Path, reload_at_once: None,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    path = keys_file(tmp_path, f"alice:{ALICE}\n")
    store = KeyStore(path)
    path.write_text(f"alice:{ALICE}\nbob {BOB}\n")
    assert store.lookup(ALICE) == "alice"
    assert store.lookup(BOB) is None
    assert "keeping the previous API keys" in caplog.text and "line 2" in caplog.text
    assert BOB not in caplog.text and ALICE not in caplog.text


def test_a_removed_file_holds_no_key(tmp_path: Path, reload_at_once: None) -> None:
    path = keys_file(tmp_path, f"alice:{ALICE}\n")
    store = KeyStore(path, f"bob:{BOB}")
    path.unlink()
    assert store.lookup(ALICE) is None
    assert store.lookup(BOB) == "bob"  # the environment's keys stay


def test_add_makes_a_strong_key_in_a_private_file(tmp_path: Path) -> None:
    path = tmp_path / "conf" / "keys"
    first = add_key(path, "alice")
    second = add_key(path, "bob")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert first != second and len(first) >= 40 and not first.startswith("-")
    assert path.read_text() == f"alice:{first}\nbob:{second}\n"
    assert [p.name for p in path.parent.iterdir()] == ["keys"]  # no temporary file left
    with pytest.raises(ConfigurationError, match="already has a key named 'alice'"):
        add_key(path, "alice")
    with pytest.raises(ConfigurationError, match="is not a key name"):
        add_key(path, "bad name")


def test_revoke_keeps_comments_and_the_other_keys(tmp_path: Path) -> None:
    path = keys_file(tmp_path, f"# alice: the first\nalice:{ALICE}\nbob:{BOB}")
    path.chmod(0o644)
    assert revoke_key(path, "alice")
    assert path.read_text() == f"# alice: the first\nbob:{BOB}"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not revoke_key(path, "alice")
    assert not revoke_key(tmp_path / "absent", "alice")
    assert key_names(path) == ["bob"]


def test_the_keys_commands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "keys"
    monkeypatch.setenv("SANDBOX_API_KEYS_FILE", str(path))
    runner = CliRunner()
    added = runner.invoke(app, ["keys", "add", "alice"])
    assert added.exit_code == 0, added.output
    key = added.stdout.strip()
    assert path.read_text() == f"alice:{key}\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert runner.invoke(app, ["keys", "add", "bob", "--file", str(path)]).exit_code == 0
    listed = runner.invoke(app, ["keys", "list"])
    assert listed.exit_code == 0
    assert listed.stdout.split() == ["alice", "bob"]
    assert key not in listed.output
    assert runner.invoke(app, ["keys", "revoke", "alice"]).exit_code == 0
    again = runner.invoke(app, ["keys", "revoke", "alice"])
    assert again.exit_code == 1 and "no key named 'alice'" in again.output
    assert runner.invoke(app, ["keys", "list"]).stdout.split() == ["bob"]
    duplicate = runner.invoke(app, ["keys", "add", "bob"])
    assert duplicate.exit_code == 1 and "already has a key named 'bob'" in duplicate.output


def test_the_keys_commands_need_a_file() -> None:
    result = CliRunner().invoke(app, ["keys", "list"])
    assert result.exit_code == 2
    assert "SANDBOX_API_KEYS_FILE is not set" in result.output
