"""A language runtime: how its driver starts inside a sandbox. Data only, no I/O.

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


@dataclass(frozen=True)
class Runtime:
    """A language: its driver, its environment directory and how to start it."""

    language: Language
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
