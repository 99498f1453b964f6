"""Docker helpers of the deployment suite: an engine, the images, compose projects.

What the suite needs it installs itself, as CI runs it on a fresh machine:

* ``docker_engine``: Debian's ``docker.io`` when ``dockerd`` is missing; an engine started
  in the background when none answers (and stopped at the end of the session: only one
  this session started); *skips*, with the reason, only when no engine can start at all.
* ``compose``: ``docker compose`` when the plugin is there, else ``docker-compose``
  (installed from Debian when missing).
* ``execbox_image``: the Dockerfile's base image made available (``docker/debian-base-image.sh``:
  pulled, or built with debootstrap when Docker Hub is unreachable), then the image built
  as ``execbox:deploy-tests``. Built images are kept, so a rerun costs little.
* ``ComposeProject``: ``docker-compose.yml`` brought up under a project name of its own on a
  free host port, and torn down (containers, network, volumes).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
IMAGE = "execbox:deploy-tests"
BASE_IMAGE = "debian:bookworm-slim"
HEALTHY_TIMEOUT_S = 180.0
BUILD_TIMEOUT_S = 1800.0


def run(argv: Sequence[str], timeout_s: float, env: dict[str, str] | None = None,
        check: bool = True, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command, capture its output; on failure raise with the command and its output."""
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout_s,
                              env=env, cwd=cwd, stdin=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"{' '.join(argv)} did not finish within {timeout_s:.0f} s") from exc
    if check and done.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
    return done


def _apt_install(*packages: str) -> str | None:
    """apt-get install the packages; None on success, else why not."""
    if shutil.which("apt-get") is None:
        return "apt-get is not available"
    if os.geteuid() != 0:
        return "not root, cannot apt-get install"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update", "-qq"],
                 ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages]):
        done = run(argv, timeout_s=900, env=env, check=False)
        if done.returncode != 0:
            return f"{' '.join(argv)} failed: {(done.stderr or done.stdout)[-800:]}"
    return None


def _engine_answers(docker: str) -> bool:
    try:
        return subprocess.run([docker, "info"], capture_output=True, timeout=20, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@dataclass
class Docker:
    """The docker CLI, against an engine that answers."""

    cli: str

    def __call__(self, *args: str, timeout_s: float = 120, check: bool = True,
                 env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return run([self.cli, *args], timeout_s=timeout_s, check=check, env=env)

    def inspect(self, name: str) -> dict[str, Any]:
        return json.loads(self("inspect", name).stdout)[0]


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[Docker]:
    """A docker CLI and a running engine; skips only when no engine can start here."""
    if shutil.which("dockerd") is None:
        why = _apt_install("docker.io")
        if why is not None or shutil.which("dockerd") is None:
            pytest.skip(f"no Docker engine can start: docker.io is not installed and {why or 'dockerd is still missing'}")
    cli = shutil.which("docker")
    if cli is None:
        pytest.skip("no Docker engine can start: the docker command is missing after installing docker.io")
    started: subprocess.Popen[bytes] | None = None
    log_path = Path(tempfile.gettempdir()) / f"execbox-deploy-dockerd-{os.getpid()}.log"
    if not _engine_answers(cli):
        with log_path.open("wb") as log:
            started = subprocess.Popen(["dockerd"], stdin=subprocess.DEVNULL, stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while not _engine_answers(cli):
            if started.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-1500:]
                _stop_engine(started)
                pytest.skip(f"no Docker engine can start: dockerd (exit {started.returncode}) said:\n{tail}")
            time.sleep(0.5)
        print(f"\ndeploy: started dockerd (pid {started.pid}, log {log_path}) for this session")
    try:
        yield Docker(cli)
    finally:
        if started is not None:
            _stop_engine(started)


def _stop_engine(process: subprocess.Popen[bytes]) -> None:
    """Stop the dockerd this session started (its containerd goes with it)."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(30)


@pytest.fixture(scope="session")
def compose(docker_engine: Docker) -> list[str]:
    """argv prefix of Docker Compose: the plugin where present, else docker-compose."""
    if run([docker_engine.cli, "compose", "version"], timeout_s=30, check=False).returncode == 0:
        return [docker_engine.cli, "compose"]
    if shutil.which("docker-compose") is None:
        why = _apt_install("docker-compose")
        if why is not None:
            raise AssertionError(f"neither `docker compose` nor docker-compose, and {why}")
    path = shutil.which("docker-compose")
    assert path is not None, "docker-compose is missing after installing it"
    return [path]


def extra_ca_certificates() -> str:
    """The CAs this host trusts beyond Debian's (a TLS-intercepting proxy's), for the build."""
    return run(["/usr/bin/python3", str(REPO / "docker" / "extra-ca-certs.py")], timeout_s=60).stdout


@pytest.fixture(scope="session")
def execbox_image(docker_engine: Docker) -> str:
    """The execbox image, built from the Dockerfile (the base image made available first)."""
    started = time.monotonic()
    run([str(REPO / "docker" / "debian-base-image.sh"), BASE_IMAGE], timeout_s=900)
    base_s = time.monotonic() - started
    docker_engine("build", "--force-rm", "--build-arg", f"EXTRA_CA_CERTS={extra_ca_certificates()}",
                  "-t", IMAGE, str(REPO), timeout_s=BUILD_TIMEOUT_S)
    size_mb = int(docker_engine("image", "inspect", "--format", "{{.Size}}", IMAGE).stdout) / 1e6
    print(f"\ndeploy: base image ready in {base_s:.0f} s; {IMAGE} built in "
          f"{time.monotonic() - started - base_s:.0f} s, {size_mb:.0f} MB")
    return IMAGE


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ComposeProject:
    """docker-compose.yml up under a project name of its own, on a free 127.0.0.1 port."""

    docker: Docker
    compose: list[str]
    image: str
    name: str
    settings: dict[str, str] = field(default_factory=dict)
    compose_file: Path = REPO / "docker-compose.yml"
    port: int = 0
    container: str = ""

    def __post_init__(self) -> None:
        # an empty env file: a developer's .env beside docker-compose.yml must not leak in
        self._env_file = Path(tempfile.mkstemp(prefix=f"{self.name}-", suffix=".env")[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("SANDBOX_") and k not in ("EXECBOX_IMAGE", "EXTRA_CA_CERTS")}
        env.update({"EXECBOX_IMAGE": self.image, "SANDBOX_BIND_HOST": "127.0.0.1",
                    "SANDBOX_EXECUTOR_MANAGER_PORT": str(self.port), **self.settings})
        return env

    def __call__(self, *args: str, timeout_s: float = 180, check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = [*self.compose, "--env-file", str(self._env_file), "-p", self.name, "-f", str(self.compose_file), *args]
        return run(argv, timeout_s=timeout_s, env=self._env(), check=check)

    def up(self) -> None:
        self.port = free_port()
        self("up", "-d", "--no-build")
        found = self.docker("ps", "-aq", "--filter", f"label=com.docker.compose.project={self.name}").stdout.split()
        assert len(found) == 1, f"expected one container in project {self.name}, found {found}"
        self.container = found[0]

    def inspect(self) -> dict[str, Any]:
        return self.docker.inspect(self.container)

    def logs(self) -> str:
        done = self.docker("logs", "--tail", "60", self.container, check=False)
        return (done.stdout + done.stderr)[-6000:]

    def wait_healthy(self, timeout_s: float = HEALTHY_TIMEOUT_S) -> float:
        """Until /healthz answers 200 and Docker's HEALTHCHECK says healthy; returns the seconds."""
        started = time.monotonic()
        deadline = started + timeout_s
        last = ""
        while time.monotonic() < deadline:
            state = self.inspect()["State"]
            if not state["Running"]:
                raise AssertionError(f"container exited ({state['ExitCode']}) during start-up:\n{self.logs()}")
            try:
                response = httpx.get(f"{self.url}/healthz", timeout=5)
                last = f"/healthz {response.status_code} {response.text[:500]}"
                health = state.get("Health", {}).get("Status")
                if response.status_code == 200 and health == "healthy":
                    return time.monotonic() - started
                last += f"; docker health {health}"
            except httpx.HTTPError as exc:
                last = f"/healthz: {exc!r}"
            time.sleep(1)
        raise AssertionError(f"{self.name} not healthy within {timeout_s:.0f} s ({last}):\n{self.logs()}")

    def down(self) -> None:
        """Containers, network and volumes go; the images stay. Raises if anything is left."""
        self("down", "-v", "--remove-orphans", "--timeout", "30", timeout_s=240)
        self._env_file.unlink(missing_ok=True)
        label = f"label=com.docker.compose.project={self.name}"
        left = {
            "containers": self.docker("ps", "-aq", "--filter", label).stdout.split(),
            "networks": self.docker("network", "ls", "-q", "--filter", label).stdout.split(),
            "volumes": self.docker("volume", "ls", "-q", "--filter", label).stdout.split(),
        }
        assert not any(left.values()), f"compose down left {left} of project {self.name}"


@pytest.fixture(scope="session")
def compose_project(docker_engine: Docker, compose: list[str], execbox_image: str) -> Any:
    """``compose_project(name, settings)`` -> a ComposeProject (not yet up)."""

    def make(suffix: str, settings: dict[str, str] | None = None) -> ComposeProject:
        return ComposeProject(docker_engine, compose, execbox_image,
                              f"execbox-deploy-{os.getpid()}-{suffix}", settings or {})

    return make
