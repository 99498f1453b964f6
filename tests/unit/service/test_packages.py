"""Packages per request, without installing anything: the requirement grammar, the policy
of SANDBOX_PACKAGES, the layer's key and spec, the reading of pip's and npm's failures,
sealing a layer and the LRU over hand-made layers (real files and locks, no installer)."""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path

import pytest

from execbox.errors import BadRequestError, ConfigurationError, PackageInstallError
from execbox.isolation.base import SandboxSpec
from execbox.models import Language
from execbox.runtimes import get_runtime
from execbox.service.package_install import INSTALLER_UID, npm_failure, pip_failure
from execbox.service.packages import (
    MAX_REQUIREMENTS,
    PACKAGES_MOUNT,
    PackageCache,
    layer_key,
    package_spec,
    parse_requirements,
    seal_layer,
)
from execbox.service.specs import sandbox_spec
from execbox.settings import Settings

PY, JS = Language.PYTHON, Language.NODEJS


def settings(tmp_path: Path, **values: object) -> Settings:
    return Settings.load(env_file=None, state_dir=tmp_path, **values)


# -- the grammar ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "canonical"),
    [
        (["tabulate"], ("tabulate",)),
        (["tabulate==0.9.0"], ("tabulate==0.9.0",)),
        (["Tabulate == 0.9.0"], ("tabulate==0.9.0",)),
        (["Foo_Bar.baz>=1.0"], ("foo-bar-baz>=1.0",)),
        (["six<2, >=1.10"], ("six<2,>=1.10",)),
        (["attrs~=23.1", "tabulate!=0.8.1"], ("attrs~=23.1", "tabulate!=0.8.1")),
        (["b", "a", "b"], ("a", "b")),
        (["numpy==2.*"], ("numpy==2.*",)),
    ],
)
def test_python_requirements_are_canonical(given: list[str], canonical: tuple[str, ...]) -> None:
    assert parse_requirements(PY, given) == canonical


@pytest.mark.parametrize(
    ("given", "canonical"),
    [
        (["is-number"], ("is-number",)),
        (["is-number@7.0.0"], ("is-number@7.0.0",)),
        (["is-number==7.0.0"], ("is-number@7.0.0",)),
        (["left-pad@^1.3", "is-number@~7"], ("is-number@~7", "left-pad@^1.3")),
        (["@types/node@20.1.0"], ("@types/node@20.1.0",)),
        (["lodash@latest"], ("lodash@latest",)),
    ],
)
def test_npm_requirements_are_canonical(given: list[str], canonical: tuple[str, ...]) -> None:
    assert parse_requirements(JS, given) == canonical


@pytest.mark.parametrize(
    "bad",
    [
        "", " ", "-r requirements.txt", "--index-url=http://evil", "tabulate @ https://evil/t.whl",
        "git+https://github.com/a/b", "./local/dir", "/abs/path.whl", "https://evil/t.whl",
        "tabulate[widechars]", "tabulate; python_version>'3'", "tabulate===0.9.0", "tabulate==0.9.0 --hash=x",
        "tab ulate", "tabulate==", "tabulate==0.9.0\nsix", "-e .", "tabulate==0.9;", "tabulate=0.9",
    ],
)
def test_python_requirements_refuse_anything_but_a_name_and_a_version(bad: str) -> None:
    with pytest.raises(BadRequestError, match="URLs, paths and options are refused"):
        parse_requirements(PY, [bad])


@pytest.mark.parametrize(
    "bad",
    [
        "", "--registry=http://evil", "git+https://github.com/a/b.git", "github:a/b", "a/b", "file:../x",
        "is-number@file:../x", "is-number@git+ssh://x", "is-number@npm:evil", "is-number@https://evil/x.tgz",
        "is-number@>=1 <2", "is-number@1||2", ".hidden", "_under", "is-number@", "@scope", "is number",
        "is-number@.", "is-number@..", "is-number@.hidden", "is-number@~/x", "is-number==../x",
    ],
)
def test_npm_requirements_refuse_anything_but_a_name_and_a_version(bad: str) -> None:
    with pytest.raises(BadRequestError, match="URLs, paths and options are refused"):
        parse_requirements(JS, [bad])


def test_a_name_twice_with_different_versions_is_refused() -> None:
    with pytest.raises(BadRequestError, match="named twice"):
        parse_requirements(PY, ["tabulate==0.9.0", "Tabulate==0.8.10"])
    with pytest.raises(BadRequestError, match="named twice"):
        parse_requirements(JS, ["is-number@7.0.0", "is-number@6.0.0"])


def test_too_many_requirements_are_refused() -> None:
    with pytest.raises(BadRequestError, match=f"at most {MAX_REQUIREMENTS}"):
        parse_requirements(PY, [f"p{i}" for i in range(MAX_REQUIREMENTS + 1)])


# -- the policy ----------------------------------------------------------------------------


def test_off_refuses_any_package_and_names_the_setting(tmp_path: Path) -> None:
    cache = PackageCache(settings(tmp_path))
    assert not cache.enabled
    assert cache.check(PY, []) == ()
    with pytest.raises(BadRequestError, match="SANDBOX_PACKAGES=off"):
        cache.check(PY, ["tabulate"])


def test_any_allows_every_valid_name(tmp_path: Path) -> None:
    cache = PackageCache(settings(tmp_path, packages="any"))
    assert cache.check(PY, ["whatever-pkg==1.0"]) == ("whatever-pkg==1.0",)
    with pytest.raises(BadRequestError, match="refused"):
        cache.check(PY, ["whatever @ https://x"])


def test_an_allowlist_allows_its_names_only_per_language(tmp_path: Path) -> None:
    cache = PackageCache(settings(tmp_path, packages="tabulate, Foo_Bar, nodejs:is-number, python:attrs"))
    assert cache.check(PY, ["tabulate==0.9.0", "foo.bar", "attrs"]) == ("attrs", "foo-bar", "tabulate==0.9.0")
    assert cache.check(JS, ["is-number@7.0.0", "tabulate"]) == ("is-number@7.0.0", "tabulate")
    with pytest.raises(BadRequestError, match=r"not allowed on this server \(SANDBOX_PACKAGES\): six"):
        cache.check(PY, ["tabulate", "six"])
    with pytest.raises(BadRequestError, match="is-number"):
        cache.check(PY, ["is-number"])  # allowed for Node.js only
    with pytest.raises(BadRequestError, match="attrs"):
        cache.check(JS, ["attrs"])


@pytest.mark.parametrize("bad", ["", "http://x", "tabulate==0.9", "ruby:gem", "a b"])
def test_a_malformed_setting_stops_start_up_naming_it(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ConfigurationError, match="SANDBOX_PACKAGES="):
        settings(tmp_path, packages=bad)


def test_settings_of_the_cache_have_sane_ranges(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="SANDBOX_PACKAGES_CACHE_SIZE"):
        settings(tmp_path, packages_cache_size="1k")
    with pytest.raises(ConfigurationError, match="SANDBOX_PACKAGES_INSTALL_TIMEOUT"):
        settings(tmp_path, packages_install_timeout="10ms")
    assert settings(tmp_path).packages == "off"


# -- the key and the spec ------------------------------------------------------------------


def test_the_key_depends_on_language_requirements_and_runtime() -> None:
    key = layer_key(PY, ("tabulate==0.9.0",), "stamp")
    assert key == layer_key(PY, ("tabulate==0.9.0",), "stamp")
    assert len({key, layer_key(JS, ("tabulate==0.9.0",), "stamp"), layer_key(PY, ("tabulate",), "stamp"),
                layer_key(PY, ("tabulate==0.9.0",), "rebuilt")}) == 4  # fmt: skip


def _spec(tmp_path: Path, language: Language) -> SandboxSpec:
    return sandbox_spec(settings(tmp_path), get_runtime(language))


def test_python_spec_mounts_the_layer_read_only_on_the_import_path(tmp_path: Path) -> None:
    base = _spec(tmp_path, PY)
    spec = package_spec(base, tmp_path / "layer")
    assert spec.mounts[-1].source == tmp_path / "layer" and spec.mounts[-1].target == PACKAGES_MOUNT
    assert not spec.mounts[-1].writable
    assert spec.env["PYTHONPATH"] == f"{PACKAGES_MOUNT}/python"
    assert "-I" in base.runtime.argv() and "-I" not in spec.runtime.argv()
    assert {"-s", "-P", "-B"} <= set(spec.runtime.argv())
    assert spec.dedicated and base.runtime.argv()[-1] == spec.runtime.argv()[-1]
    assert {k: v for k, v in spec.env.items() if k != "PYTHONPATH"} == dict(base.env)


def test_nodejs_spec_puts_the_layer_first_on_node_path(tmp_path: Path) -> None:
    base = _spec(tmp_path, JS)
    spec = package_spec(base, tmp_path / "layer")
    assert spec.env["NODE_PATH"] == f"{PACKAGES_MOUNT}/node_modules:{base.env['NODE_PATH']}"
    assert spec.runtime == base.runtime and spec.mounts[-1].target == PACKAGES_MOUNT


# -- what the installers said ---------------------------------------------------------------

_PIP_SDIST_ONLY = """\
Fetching project page and analyzing links: https://pypi.org/simple/docopt/
  Skipping link: No sources permitted for docopt: https://files.example/docopt-0.6.2.tar.gz (from https://pypi.org/simple/docopt/)
ERROR: Could not find a version that satisfies the requirement docopt (from versions: none)
ERROR: No matching distribution found for docopt
"""
_PIP_NOT_FOUND = """\
https://pypi.org:443 "GET /simple/nope-xyz/ HTTP/1.1" 404 0
Could not fetch URL https://pypi.org/simple/nope-xyz/: 404 Client Error: Not Found for url: https://pypi.org/simple/nope-xyz/ - skipping
ERROR: Could not find a version that satisfies the requirement nope-xyz (from versions: none)
ERROR: No matching distribution found for nope-xyz
"""
_PIP_NO_VERSION = """\
  Skipping link: No sources permitted for tabulate: https://files.example/tabulate-0.9.0.tar.gz (from https://pypi.org/simple/tabulate/)
ERROR: Could not find a version that satisfies the requirement tabulate==99 (from versions: 0.8.10, 0.9.0)
ERROR: No matching distribution found for tabulate==99
"""
_PIP_WRONG_PLATFORM = """\
  Skipping link: none of the wheel's tags (cp312-cp312-win_amd64) are compatible (run pip debug --verbose to show compatible tags): https://files.example/winonly-1.0-cp312-cp312-win_amd64.whl (from https://pypi.org/simple/winonly/)
  Skipping link: No sources permitted for winonly: https://files.example/winonly-1.0.tar.gz (from https://pypi.org/simple/winonly/)
ERROR: Could not find a version that satisfies the requirement winonly (from versions: none)
ERROR: No matching distribution found for winonly
"""
_PIP_UNREACHABLE = """\
WARNING: Retrying (Retry(total=0)) after connection broken by 'NewConnectionError('Failed to establish a new connection: [Errno 111] Connection refused')': /simple/tabulate/
Could not fetch URL http://127.0.0.1:9/simple/tabulate/: There was a problem confirming the ssl certificate: Max retries exceeded
ERROR: Could not find a version that satisfies the requirement tabulate (from versions: none)
ERROR: No matching distribution found for tabulate
"""
_PIP_CONFLICT = """\
ERROR: Cannot install a==1 and b==2 because these package versions have conflicting dependencies.
ERROR: ResolutionImpossible: for help visit https://pip.pypa.io/en/latest/topics/dependency-resolution/#dealing-with-dependency-conflicts
"""


@pytest.mark.parametrize(
    ("output", "requested", "kind", "message"),
    [
        (_PIP_SDIST_ONLY, ("docopt",), BadRequestError, "docopt has only source distributions"),
        (_PIP_SDIST_ONLY, ("docopt-user",), BadRequestError, r"docopt \(a dependency of the requested packages\)"),
        (_PIP_NOT_FOUND, ("nope-xyz",), BadRequestError, "nope-xyz does not exist on the package index"),
        (_PIP_NO_VERSION, ("tabulate==99",), BadRequestError, "no version of tabulate matches.*0.8.10, 0.9.0"),
        (_PIP_WRONG_PLATFORM, ("winonly",), BadRequestError, "no binary wheel for the sandboxes' Python"),
        (_PIP_UNREACHABLE, ("tabulate",), PackageInstallError, "could not be reached"),
        (_PIP_CONFLICT, ("a==1", "b==2"), BadRequestError, "cannot be installed together"),
        ("Traceback ...\nOSError: [Errno 28] No space left on device\n", ("a",), PackageInstallError, "No space left"),
    ],
)
def test_pip_failures_are_read_from_its_own_words(
    output: str, requested: tuple[str, ...], kind: type[Exception], message: str
) -> None:
    error = pip_failure(output, requested)
    assert type(error) is kind
    assert __import__("re").search(message, str(error)), str(error)


@pytest.mark.parametrize(
    ("output", "kind", "message"),
    [
        ("npm error code E404\nnpm error 404 Not Found - GET https://registry.npmjs.org/nope-xyz - Not found\n",
         BadRequestError, "nope-xyz does not exist on the npm registry"),
        ("npm error code E404\nnpm error 404 Not Found - GET https://registry.npmjs.org/@scope%2fnope\n",
         BadRequestError, "@scope/nope does not exist"),
        ("npm error code ETARGET\nnpm error notarget No matching version found for is-number@99.0.0.\n",
         BadRequestError, "no version matches is-number@99.0.0"),
        ("npm error code ERESOLVE\nnpm error ERESOLVE unable to resolve dependency tree\n",
         BadRequestError, "cannot be installed together"),
        ("npm error code ECONNREFUSED\nnpm error errno ECONNREFUSED\n", PackageInstallError, "could not be reached"),
        ("npm error code EACCES\n", PackageInstallError, "npm could not install"),
    ],
)  # fmt: skip
def test_npm_failures_are_read_from_its_own_words(output: str, kind: type[Exception], message: str) -> None:
    error = npm_failure(output)
    assert type(error) is kind
    assert message in str(error), str(error)


# -- sealing a layer -----------------------------------------------------------------------


def _as_installer(path: Path) -> None:
    if os.geteuid() == 0:
        os.lchown(path, INSTALLER_UID, INSTALLER_UID)


def _installed_tree(root: Path) -> Path:
    layer = root / "layer"
    (layer / "python" / "pkg").mkdir(parents=True)
    (layer / "python" / "pkg" / "__init__.py").write_text("x = 1\n")
    (layer / "python" / "bin").mkdir()
    (layer / "python" / "bin" / "tool").write_text("#!/bin/sh\n")
    (layer / "python" / "bin" / "tool").chmod(0o755)
    (layer / "python" / "link").symlink_to("/etc/passwd")
    for path in [layer, *layer.rglob("*")]:
        _as_installer(path)
    return layer


def test_a_sealed_layer_is_read_only_and_roots_without_following_links(tmp_path: Path) -> None:
    layer = _installed_tree(tmp_path)
    passwd_mode = os.stat("/etc/passwd").st_mode
    assert seal_layer(layer) > 0
    assert oct(os.stat(layer / "python" / "pkg" / "__init__.py").st_mode & 0o777) == oct(0o444)
    assert oct(os.stat(layer / "python" / "bin" / "tool").st_mode & 0o777) == oct(0o555)
    assert oct(os.stat(layer / "python" / "pkg").st_mode & 0o777) == oct(0o555)
    assert os.stat("/etc/passwd").st_mode == passwd_mode  # the link was not followed
    if os.geteuid() == 0:
        assert {os.lstat(p).st_uid for p in [layer, *layer.rglob("*")]} == {0}


@pytest.mark.skipif(os.geteuid() != 0, reason="ownership checks apply when the service is root (run as root)")
def test_a_layer_with_a_file_the_installer_does_not_own_is_refused(tmp_path: Path) -> None:
    layer = _installed_tree(tmp_path)
    foreign = layer / "python" / "foreign"
    foreign.write_text("planted\n")  # root's, as a hard link to a host file would be
    with pytest.raises(PackageInstallError, match="owned by uid 0"):
        seal_layer(layer)
    assert foreign.stat().st_mode & 0o222  # left as it was


# -- the LRU over hand-made layers ------------------------------------------------------------


def _fake_layer(cache: PackageCache, key: str, size_bytes: int, last_use: float) -> None:
    (cache.root / key).mkdir(parents=True)
    (cache.root / key / "file").write_bytes(b"x" * 10)
    record = cache.root / f"{key}.json"
    record.write_text(json.dumps({"size_bytes": size_bytes, "installed": ["x==1"]}))
    os.utime(record, (last_use, last_use))


def test_eviction_removes_least_recently_used_layers_nobody_holds(tmp_path: Path) -> None:
    cache = PackageCache(settings(tmp_path, packages="any").model_copy(update={"packages_cache_size": 250}))
    cache.root.mkdir()
    now = time.time()
    for age, key in enumerate(("newest", "held", "middle", "oldest")):
        _fake_layer(cache, key, 100, now - 100 * age)
    held = os.open(cache.root / "held.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(held, fcntl.LOCK_SH)  # a sandbox uses it
    try:
        cache._evict(protect=None)
    finally:
        os.close(held)
    assert sorted(p.stem for p in cache.root.glob("*.json")) == ["held", "newest"]
    assert not (cache.root / "oldest").exists() and not (cache.root / "middle").exists()
    assert cache.counts["evictions"] == 2 and not cache._over_cap


def test_a_cache_above_its_size_with_layers_in_use_evicts_when_they_are_let_go(tmp_path: Path) -> None:
    cache = PackageCache(settings(tmp_path, packages="any").model_copy(update={"packages_cache_size": 150}))
    cache.root.mkdir()
    now = time.time()
    _fake_layer(cache, "a", 100, now - 10)
    _fake_layer(cache, "b", 100, now)
    lease = cache._hit("a", blocking=False)  # a sandbox uses a (now the most recently used)
    assert lease is not None and lease.path == cache.root / "a"
    cache._evict(protect="b")  # b was just built
    assert (cache.root / "a.json").exists() and (cache.root / "b.json").exists() and cache._over_cap
    lease.release()  # the eviction runs again, in the cache's thread: b is the least recently used
    cache.close()
    assert (cache.root / "a.json").exists() and not (cache.root / "b.json").exists()
    assert not cache._over_cap


def test_start_removes_what_a_crashed_build_left(tmp_path: Path) -> None:
    cache = PackageCache(settings(tmp_path, packages="any"))
    cache.root.mkdir()
    _fake_layer(cache, "k" * 32, 10, time.time())
    (cache.root / f".build-{'c' * 32}-x1y2").mkdir()
    (cache.root / ("d" * 32)).mkdir()  # a layer without its record
    cache.start()
    assert sorted(p.name for p in cache.root.iterdir() if not p.name.endswith(".lock")) == ["k" * 32, f"{'k' * 32}.json"]


def test_a_refused_set_is_answered_again_without_running_the_installer(tmp_path: Path) -> None:
    cache = PackageCache(settings(tmp_path, packages="any"))
    cache.root.mkdir()
    (tmp_path / "env").mkdir()
    calls = []

    def refuse(*args: object) -> None:
        calls.append(args)
        raise BadRequestError("nope-xyz does not exist on the package index")

    cache._get_or_build = refuse  # type: ignore[assignment,method-assign]
    for _ in range(3):
        with pytest.raises(BadRequestError, match="nope-xyz does not exist"):
            __import__("asyncio").run(cache.acquire(PY, ("nope-xyz",), tmp_path / "env"))
    assert len(calls) == 1
    cache.close()
