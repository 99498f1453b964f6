"""API keys: who is calling, from ``SANDBOX_API_KEYS_FILE`` and/or ``SANDBOX_API_KEYS``.

The file holds one key a line as ``name:key`` (blank lines and lines starting with ``#``
are skipped); ``SANDBOX_API_KEYS`` holds the same entries comma-separated. Names are
unique, made of letters, digits, ``.``, ``_`` and ``-`` (they label metrics and own
sessions); keys are at least 16 printable characters without spaces, and no two names
share one. A malformed entry is a ConfigurationError naming the setting and the line,
never the key.

:meth:`KeyStore.lookup` compares the digest of the presented key with the digest of
every known key with :func:`hmac.compare_digest`, always all of them, so that neither the
time taken nor an early exit says how much of a key was right. The file is read again
when it changes (its mtime, size or inode, looked at no more than once a second), so
``execbox keys add`` and ``execbox keys revoke`` take effect without a restart; a file
made malformed by hand keeps the keys it had (logged), a file removed holds no key.

The helpers at the end manage the file for the ``execbox keys`` commands: each rewrite
is atomic (a temporary file, mode 0600, renamed over the old one) under a lock on the
directory, so concurrent commands never lose an entry and the service never reads half a
file. Nothing here logs or returns a key, except :func:`add_key` to the one who asked.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import logging
import os
import re
import secrets
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from execbox.errors import ConfigurationError
from execbox.settings import Settings

__all__ = ["KeyStore", "add_key", "generate_key", "key_names", "parse_keys", "revoke_key"]

log = logging.getLogger("execbox.apikeys")

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
KEY = re.compile(r"[!-~]+")  # printable ASCII, no space: what an HTTP header carries as is
MIN_KEY_LENGTH = 16
#: how often a lookup looks at the file for a change
RELOAD_CHECK_S = 1.0
FILE_SETTING = "SANDBOX_API_KEYS_FILE"
ENV_SETTING = "SANDBOX_API_KEYS"


@dataclass(frozen=True)
class _Entry:
    name: str
    digest: bytes


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


def parse_keys(entries: list[tuple[str, str]], where: str) -> dict[str, str]:
    """``[(place, "name:key"), ...]`` -> {name: key}; ConfigurationError naming ``where`` and the place."""
    keys: dict[str, str] = {}
    owners: dict[str, str] = {}
    for place, text in entries:
        name, sep, key = text.partition(":")
        name, key = name.strip(), key.strip()
        problem = None
        if not sep:
            problem = "is not name:key"
        elif not NAME.fullmatch(name):
            problem = "has a name that is not 1-64 letters, digits, '.', '_' or '-' (starting with a letter or digit)"
        elif not key:
            problem = f"gives {name!r} an empty key"
        elif not KEY.fullmatch(key):
            problem = f"gives {name!r} a key with spaces or characters outside printable ASCII"
        elif len(key) < MIN_KEY_LENGTH:
            problem = f"gives {name!r} a key shorter than {MIN_KEY_LENGTH} characters (`execbox keys add` makes strong ones)"
        elif name in keys:
            problem = f"names {name!r} a second time"
        elif key in owners:
            problem = f"gives {name!r} the key of {owners[key]!r}"
        if problem:
            raise ConfigurationError(f"{where}: {place} {problem}")
        keys[name] = key
        owners[key] = name
    return keys


def _file_entries(text: str) -> list[tuple[str, str]]:
    return [
        (f"line {number}", line.strip())
        for number, line in enumerate(text.splitlines(), 1)
        if line.strip() and not line.strip().startswith("#")
    ]


def _read_file(path: Path) -> dict[str, str]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"{FILE_SETTING}={str(path)!r}: cannot be read: {exc}") from exc
    return parse_keys(_file_entries(text), f"{FILE_SETTING}={str(path)!r}")


def _env_keys(inline: str) -> dict[str, str]:
    entries = [(f"entry {n}", part.strip()) for n, part in enumerate(inline.split(","), 1) if part.strip()]
    return parse_keys(entries, ENV_SETTING)


class KeyStore:
    """The keys the service accepts; ``lookup(key)`` is the key's name, or None."""

    def __init__(self, file: Path | None = None, inline: str = "") -> None:
        self.file = file
        self._inline = _env_keys(inline)
        self._entries: tuple[_Entry, ...] = ()
        self._stamp: tuple[int, int, int] | None = None
        self._checked_at = 0.0
        file_keys: dict[str, str] = {}
        if file is not None:
            if not file.is_file():
                raise ConfigurationError(
                    f"{FILE_SETTING}={str(file)!r} does not exist: create it with `execbox keys add NAME`"
                )
            self._stamp = self._file_stamp()
            file_keys = _read_file(file)
            if os.stat(file).st_mode & 0o077:
                log.warning("%s %s is readable by others than its owner: chmod 600 it", FILE_SETTING, file)
        self._install(file_keys)

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyStore | None:
        """The settings' keys; None when keys are off (neither setting is given)."""
        if not settings.keys_enabled:
            return None
        path = settings.api_keys_file.strip()
        return cls(Path(path) if path else None, settings.api_keys.get_secret_value())

    def _install(self, file_keys: dict[str, str]) -> None:
        merged = dict(file_keys)
        for name, key in self._inline.items():
            merged[name] = key
        both = sorted(set(file_keys) & set(self._inline))
        if both:
            raise ConfigurationError(f"{ENV_SETTING} and {FILE_SETTING} both name {', '.join(both)}")
        # one key under two names across the two sources
        parse_keys([(f"key {name!r}", f"{name}:{key}") for name, key in merged.items()], f"{ENV_SETTING} with {FILE_SETTING}")
        self._entries = tuple(_Entry(name, _digest(key)) for name, key in merged.items())

    def _file_stamp(self) -> tuple[int, int, int] | None:
        assert self.file is not None
        try:
            st = os.stat(self.file)
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _reload_if_changed(self) -> None:
        now = time.monotonic()
        if self.file is None or now - self._checked_at < RELOAD_CHECK_S:
            return
        self._checked_at = now
        stamp = self._file_stamp()
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            file_keys = {} if stamp is None else _read_file(self.file)
            self._install(file_keys)
        except ConfigurationError as exc:
            log.error("keeping the previous API keys: %s", exc)
            return
        if stamp is None:
            log.error("%s %s was removed: only the keys of %s are accepted", FILE_SETTING, self.file, ENV_SETTING)
        log.info("API keys reloaded from %s: %d key(s)", self.file, len(self._entries))

    def lookup(self, presented: str | None) -> str | None:
        """The name of the key ``presented``, or None; takes the same time whichever key matches."""
        self._reload_if_changed()
        if not presented:
            return None
        digest = _digest(presented)
        found = None
        for entry in self._entries:
            if hmac.compare_digest(digest, entry.digest):
                found = entry.name
        return found

    def names(self) -> list[str]:
        self._reload_if_changed()
        return [entry.name for entry in self._entries]


# -- managing the file (execbox keys add / list / revoke) --------------------------------


def generate_key() -> str:
    """A new key: ``execbox_`` and 32 random bytes in URL-safe base64 (51 characters; the prefix
    lets secret scanners spot a leaked one, and no key starts with ``-``)."""
    return "execbox_" + secrets.token_urlsafe(32)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _rewrite(path: Path, text: str) -> None:
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:  # mkstemp makes it 0600
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise


def _current(path: Path) -> tuple[str, dict[str, str]]:
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    return text, parse_keys(_file_entries(text), f"{FILE_SETTING}={str(path)!r}")


def add_key(path: Path, name: str) -> str:
    """Append ``name:<new key>`` to the file (made, mode 0600, if missing); the new key.
    ConfigurationError for a bad name or one the file already has."""
    if not NAME.fullmatch(name):
        raise ConfigurationError(f"{name!r} is not a key name: 1-64 letters, digits, '.', '_' or '-'")
    key = generate_key()
    with _locked(path):
        text, keys = _current(path)
        if name in keys:
            raise ConfigurationError(f"{path} already has a key named {name!r} (revoke it first)")
        if text and not text.endswith("\n"):
            text += "\n"
        _rewrite(path, f"{text}{name}:{key}\n")
    return key


def revoke_key(path: Path, name: str) -> bool:
    """Remove the key ``name`` from the file; False when it had none of that name."""
    with _locked(path):
        if not path.exists():
            return False
        text, keys = _current(path)
        if name not in keys:
            return False
        kept = [line for line in text.splitlines(keepends=True) if line.partition(":")[0].strip() != name
                or line.strip().startswith("#")]
        _rewrite(path, "".join(kept))
    return True


def key_names(path: Path) -> list[str]:
    """The names of the keys in the file, in its order (never the keys)."""
    return list(_current(path)[1]) if path.exists() else []
