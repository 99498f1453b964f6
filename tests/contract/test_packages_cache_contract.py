"""The package cache with real installations (PyPI and npm): built once, read-only, evicted
least recently used first, never while in use. No sandbox: the layers are read on the host.

Runs as root (the installers then run as nobody, and the layers end up root's); a state
directory of its own, traversable by the installer's user.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from execbox.models import Language
from execbox.service.packages import LayerLease, PackageCache
from execbox.settings import Settings


@pytest.fixture
def cache(sandbox_settings: Settings) -> Iterator[PackageCache]:
    if os.geteuid() != 0:
        pytest.skip("the package cache suite runs as root (installers as nobody): run pytest as root")
    state_dir = Path(tempfile.mkdtemp(prefix="execbox-packages-"))
    state_dir.chmod(0o755)
    (state_dir / "runtimes").symlink_to(sandbox_settings.runtime_dir.resolve(), target_is_directory=True)
    package_cache = PackageCache(sandbox_settings.model_copy(update={"state_dir": state_dir, "packages": "any"}))
    assert package_cache.start() == []
    try:
        yield package_cache
    finally:
        package_cache.close()
        shutil.rmtree(state_dir, ignore_errors=True)


def acquire(cache: PackageCache, language: Language, *requirements: str) -> LayerLease:
    env_dir = cache.settings.runtime_dir / language.value
    return asyncio.run(cache.acquire(language, cache.check(language, requirements), env_dir))


def test_a_layer_is_read_only_roots_and_holds_only_what_the_runtime_lacks(cache: PackageCache) -> None:
    lease = acquire(cache, Language.PYTHON, "tabulate==0.9.0")
    try:
        assert lease.path is not None and (lease.path / "python" / "tabulate" / "__init__.py").is_file()
        entries = [lease.path, *lease.path.rglob("*")]
        assert {p.lstat().st_uid for p in entries} == {0}
        assert not [p for p in entries if not p.is_symlink() and p.lstat().st_mode & 0o222]
        names = {p.name.split("-")[0].lower() for p in (lease.path / "python").glob("*.dist-info")}
        assert names == {"tabulate"}
    finally:
        lease.release()
    seaborn = acquire(cache, Language.PYTHON, "seaborn==0.13.2")  # needs numpy, pandas, matplotlib: the runtime's
    try:
        assert seaborn.path is not None
        assert {p.name.split("-")[0] for p in (seaborn.path / "python").glob("*.dist-info")} == {"seaborn"}
    finally:
        seaborn.release()


def test_the_least_recently_used_layer_nobody_holds_is_evicted(cache: PackageCache) -> None:
    acquire(cache, Language.PYTHON, "tabulate==0.9.0").release()
    tabulate_bytes = cache.stats()["size_bytes"]
    cache.settings = cache.settings.model_copy(update={"packages_cache_size": tabulate_bytes + 4096})  # one layer fits

    held = acquire(cache, Language.NODEJS, "is-number@7.0.0")  # over the size: tabulate, unheld, goes
    assert cache.counts["evictions"] == 1
    assert cache.stats()["layers"] == 1 and held.path is not None and held.path.is_dir()

    again = acquire(cache, Language.PYTHON, "tabulate==0.9.0")  # built again; is-number is in use: both stay
    assert cache.counts["installs"] == 3 and cache.counts["evictions"] == 1
    assert cache.stats()["layers"] == 2
    held.release()  # now is-number, the least recently used, goes
    again.release()
    cache.close()  # (the eviction ran in the cache's thread)
    assert cache.counts["evictions"] == 2 and cache.stats()["layers"] == 1
    assert not held.path.exists()
    assert acquire(cache, Language.PYTHON, "tabulate==0.9.0").path is not None and cache.counts["hits"] == 1
