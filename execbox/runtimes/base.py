"""A language runtime: everything language-specific, declared once. Data only, no I/O.

A :class:`Runtime` says how its driver starts inside a sandbox and, for the layers above,
what they need to know about the language: its display name and other names, the file
suffixes of its programs, its host interpreter, which environment builder and which package
installer of the service layer serve it (by name), its package grammar
(:class:`PackageGrammar`: pure functions), which static-inspection rule set of
:mod:`execbox.policy` applies (by name), and whether ``SANDBOX_PYTHON_PRELOAD`` applies.
The code that does I/O or holds rules stays in its layer (the service's builders and
installers, the policy's rule sets) and is found there by the name the runtime gives; see
docs/architecture.md, "Adding a language".

A driver is a small program that runs *inside* the sandbox. It starts, tells the host
it is ready, waits for one request on its control channel, calls ``main`` and reports
the outcome on a channel of its own (never as a marker in stdout).

Driver protocol (both directions: 4-byte big-endian length + UTF-8 JSON):

The two channels are inherited pipes whose numbers the driver reads from the
environment variables ``EXECBOX_CONTROL_FD`` and ``EXECBOX_EVENTS_FD`` (then removes).

* control, host -> driver: one request
  ``{"code": str, "arguments": {...}, "stdin": str, "files": {name: b64}, "env": {...},
  "token": str, "egress"?: {"port": int, "socket": str}}``; with ``egress`` the driver
  first starts a bridge: a listener on ``127.0.0.1:port`` whose every connection it
  forwards to the UNIX socket ``socket`` (the egress proxy), and makes the runtime's HTTP
  clients use ``HTTP_PROXY``/``HTTPS_PROXY`` (set in ``env``)
* events, driver -> host: ``{"event": "ready"}`` once started, then
  ``{"event": "done", "exit_code": int 0..255, "result": {"present": bool, "value": any} | null,
  "error_kind": "memory" | "network" | "file" | "result" | null, "time_ms": float,
  "token": str}``. ``token`` is the request's, returned as it came: the host believes no
  report without it (user code shares the driver's process and may write on the channel).
  ``error_kind: "result"`` says main returned a value JSON cannot carry (the reason is on
  stderr). After "done" the driver blocks until the sandbox is destroyed, so that the
  host can collect artifacts from a live sandbox.

The drivers keep the channel fds and the token out of the user's reach by name (locals and
closures, never module globals; the two variables are deleted before user code runs).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from execbox.models import Language

__all__ = [
    "CONTROL_FD_ENV",
    "DRIVER_MOUNT",
    "EGRESS_DIR",
    "EGRESS_PORT",
    "EGRESS_SOCKET_NAME",
    "EVENTS_FD_ENV",
    "RUNTIME_MOUNT",
    "SYSTEM_PYTHON",
    "WORKSPACE",
    "PackageGrammar",
    "Runtime",
]

CONTROL_FD_ENV = "EXECBOX_CONTROL_FD"
EVENTS_FD_ENV = "EXECBOX_EVENTS_FD"
#: where a sandbox sees its runtime environment, its driver and its working directory
RUNTIME_MOUNT = "/opt/runtime"
DRIVER_MOUNT = "/opt/driver"
WORKSPACE = "/workspace"
#: egress: the directory holding the proxy's socket inside a sandbox, and the loopback port
#: the driver's bridge listens on there (HTTP_PROXY=http://127.0.0.1:EGRESS_PORT)
EGRESS_DIR = "/run/egress"
EGRESS_SOCKET_NAME = "proxy.sock"
EGRESS_PORT = 3128
#: the interpreter of the fork server for runtimes whose driver is exec'd
SYSTEM_PYTHON = "/usr/bin/python3"


def _unchanged(argv_template: tuple[str, ...]) -> tuple[str, ...]:
    return argv_template


@dataclass(frozen=True, kw_only=True)
class PackageGrammar:
    """How a runtime's packages per request are named, installed and seen (pure functions)."""

    #: what a valid requirement looks like, for the error message ("a PyPI name with ...")
    form: str
    #: one requirement: group 1 is the name, group 2 the version part (or None)
    pattern: re.Pattern[str]
    #: (name, canonical requirement) of a match of ``pattern``
    canonical: Callable[[re.Match[str]], tuple[str, str]]
    #: the name of a canonical requirement, as the allowlist compares it
    name_of: Callable[[str], str]
    #: a SANDBOX_PACKAGES entry spelled as ``name_of`` spells names
    normalise: Callable[[str], str]
    #: which installer builds a layer: a key of ``execbox.service.package_install.INSTALLERS``
    installer: str
    #: the sandbox's environment with the layer (mounted at the given path) on the import path
    layer_env: Callable[[dict[str, str], str], dict[str, str]]
    #: the driver's argv template when a layer is mounted (the interpreter must honour it)
    layer_argv: Callable[[tuple[str, ...]], tuple[str, ...]] = _unchanged


@dataclass(frozen=True, kw_only=True)
class Runtime:
    """A language: its driver, its environment directory, how to start it, and what the
    layers above need to know about it (see the module docstring)."""

    language: Language
    #: the language as people write it ("Python", "Node.js"), for tool descriptions
    display_name: str
    #: other names the registry and the static check accept (besides ``name``)
    aliases: tuple[str, ...] = ()
    #: file name suffixes of its programs (``execbox run FILE`` picks the language by them)
    file_suffixes: tuple[str, ...]
    #: the host interpreter the environment is built for (its identity is part of the build stamp)
    interpreter: Path
    #: which builder makes the environment: a key of ``execbox.service.environments.BUILDERS``
    builder: str
    #: a file of the built environment with a ``version = X.Y.Z`` line (pyvenv.cfg); None: ask
    #: ``interpreter --version``
    version_file: str | None = None
    #: which static-inspection rule set applies: a key of ``execbox.policy.INSPECTORS``
    inspector: str
    #: package names, installer and layer of packages per request
    packages: PackageGrammar
    #: whether SANDBOX_PYTHON_PRELOAD's modules are imported once by the fork server
    preload: bool = False
    #: host path of the driver program (shipped inside the package)
    driver_path: Path
    #: file with the packages of the environment (requirements.txt / package.json)
    packages_file: Path
    #: argv inside the sandbox; ``{runtime}`` and ``{driver}`` are replaced by the mounts
    argv_template: tuple[str, ...]
    #: environment variables inside the sandbox (besides the common ones)
    env: tuple[tuple[str, str], ...] = field(default=())
    #: host paths a sandbox needs read-only besides /usr (e.g. the interpreter if elsewhere)
    extra_ro_paths: tuple[str, ...] = field(default=())
    #: the fork server imports this driver once and calls it in each sandbox (Python); other
    #: drivers are exec'd there with their channels at fds 3 and 4
    driver_in_process: bool = False

    @property
    def name(self) -> str:
        return self.language.value

    def env_dir(self, runtime_dir: Path) -> Path:
        """Host directory that holds this runtime's built environment."""
        return runtime_dir / self.name

    def argv(self) -> list[str]:
        driver = f"{DRIVER_MOUNT}/{self.driver_path.name}"
        return [a.format(runtime=RUNTIME_MOUNT, driver=driver) for a in self.argv_template]
