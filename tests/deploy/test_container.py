"""docker-compose.yml for real: RAGFlow's /run contract from the container, on both backends.

For each backend (``SANDBOX_BACKEND=namespaces``, ``gvisor``) the compose file is brought up
as its own project on a free port, with the backend and a short time limit passed the way a
user passes settings (the environment of ``docker compose``), and torn down at the end. The
last test of each stops the container and checks that execbox destroyed every sandbox.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

if TYPE_CHECKING:
    from conftest import ComposeProject, Docker

pytestmark = pytest.mark.timeout(1800)  # the first test pays for the engine and the image build

BACKENDS = ("namespaces", "gvisor")
#: what docker-compose.yml may grant, and all of it: no more (a wider container) and no
#: fewer (a backend would break)
CAPABILITIES = {
    "SYS_ADMIN", "SETUID", "SETGID", "SYS_CHROOT", "CHOWN", "SETFCAP", "KILL", "SYS_PTRACE", "DAC_READ_SEARCH", "SYS_NICE", "NET_ADMIN",
}  # fmt: skip
#: not the default (10 s), so that the answer shows the setting reached the container; long
#: enough for pandas + matplotlib under gVisor on a busy 2-core machine
TIMEOUT_S = 8
RUN_FIELDS = {
    "status", "stdout", "stderr", "exit_code", "detail", "time_used_ms", "memory_used_kb",
    "resource_limit_type", "unauthorized_access_type", "runtime_error_type", "artifacts", "result",
}  # fmt: skip


@pytest.fixture(scope="module", params=BACKENDS)
def service(request: pytest.FixtureRequest, compose_project: Any) -> Iterator[ComposeProject]:
    backend = str(request.param)
    project: ComposeProject = compose_project(backend, {
        "SANDBOX_BACKEND": backend,
        "SANDBOX_TIMEOUT": f"{TIMEOUT_S}s",
        "SANDBOX_EXECUTOR_MANAGER_POOL_SIZE": "2",
    })
    try:
        project.up()
        took_s = project.wait_healthy()
        print(f"\ndeploy: {project.name} healthy {took_s:.1f} s after `up`")
        yield project
    finally:
        project.down()


def run(service: ComposeProject, code: str, language: str | None = None, arguments: Any = None) -> dict[str, Any]:
    body: dict[str, Any] = {"code_b64": base64.b64encode(code.encode()).decode()}
    if language is not None:
        body["language"] = language
    if arguments is not None:
        body["arguments"] = arguments
    response = httpx.post(f"{service.url}/run", json=body, timeout=60)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert set(answer) == RUN_FIELDS, f"fields differ from RAGFlow's: {sorted(set(answer) ^ RUN_FIELDS)}"
    return answer


def test_healthz_names_the_backend_asked_for(service: ComposeProject) -> None:
    for path in ("/", "/healthz"):
        response = httpx.get(f"{service.url}{path}", timeout=10)
        assert response.status_code == 200, response.text
        assert response.json()["status"] == "ok"
    health = httpx.get(f"{service.url}/healthz", timeout=10).json()
    assert health["backend"] == service.settings["SANDBOX_BACKEND"], health
    assert health["warnings"] == [], health


def test_start_up_logs_no_warning(service: ComposeProject) -> None:
    """The backend's start-up checks pass as they are, with the compose file's capabilities."""
    warnings = [line for line in service.logs().splitlines() if '"level": "WARNING"' in line and '"execbox.' in line]
    assert warnings == [], warnings


def test_python_success(service: ComposeProject) -> None:
    code = "def main(arg1: str, arg2: str) -> str:\n    print('adding')\n    return f'result: {arg1 + arg2}'\n"
    body = run(service, code, "python", {"arg1": "Hello, ", "arg2": "RAGFlow"})
    assert body["status"] == "success", body
    assert body["exit_code"] == 0
    assert body["stdout"] == "adding\n"
    assert body["result"] == {"present": True, "value": "result: Hello, RAGFlow", "type": "json"}


def test_nodejs_success_with_and_without_module_exports(service: ComposeProject) -> None:
    for tail in ("", "\nmodule.exports = { main };\n"):
        code = "async function main({a, b}) {\n  console.log('sum');\n  return a + b;\n}" + tail
        body = run(service, code, "nodejs", {"a": 40, "b": 2})
        assert body["status"] == "success", body
        assert body["stdout"] == "sum\n"
        assert body["result"]["value"] == 42


def test_runtime_packages_built_into_the_image(service: ComposeProject) -> None:
    code = (
        "import numpy, pandas, requests\nimport matplotlib.pyplot as plt\n"
        "def main():\n    plt.plot([1, 2], [3, 4])\n    plt.savefig('artifacts/chart.png')\n"
        "    return int(pandas.Series(numpy.arange(5)).sum())\n"
    )
    body = run(service, code)
    assert body["status"] == "success", body
    assert body["result"]["value"] == 10
    assert [a["name"] for a in body["artifacts"]] == ["chart.png"]
    assert base64.b64decode(body["artifacts"][0]["content_b64"]).startswith(b"\x89PNG")
    js = run(service, "const axios = require('axios');\nfunction main() { return typeof axios.get; }", "nodejs")
    assert js["status"] == "success", js
    assert js["result"]["value"] == "function"


def test_program_error(service: ComposeProject) -> None:
    body = run(service, "def main():\n    raise ValueError('boom')\n")
    assert body["status"] == "program_error", body
    assert body["exit_code"] == 1
    assert "ValueError: boom" in body["stderr"]
    assert body["result"] is None


def test_timeout_is_minus_124(service: ComposeProject) -> None:
    started = time.monotonic()
    body = run(service, "import time\ndef main():\n    print('before', flush=True)\n    time.sleep(60)\n")
    took_s = time.monotonic() - started
    assert body["status"] == "resource_limit_exceeded", body
    assert body["exit_code"] == -124
    assert body["resource_limit_type"] == "time"
    assert f"Execution timeout after {TIMEOUT_S}s" in body["stderr"], body["stderr"]
    assert body["stdout"] == "before\n"  # partial output is kept
    assert TIMEOUT_S <= took_s < TIMEOUT_S + 15, f"SANDBOX_TIMEOUT={TIMEOUT_S}s from compose's environment, took {took_s:.1f} s"


def test_invalid_base64_is_422(service: ComposeProject) -> None:
    response = httpx.post(f"{service.url}/run", json={"code_b64": "%%% not base64 %%%"}, timeout=30)
    assert response.status_code == 422, response.text


def test_not_privileged_and_no_docker_socket(service: ComposeProject) -> None:
    info = service.inspect()
    host = info["HostConfig"]
    assert host["Privileged"] is False
    assert host["CapDrop"] == ["ALL"], host["CapDrop"]
    assert {c.removeprefix("CAP_") for c in host["CapAdd"]} == CAPABILITIES, host["CapAdd"]
    mounts = info["Mounts"] + [{"Source": b.split(":")[0], "Destination": b.split(":")[1]} for b in host.get("Binds") or []]
    for mount in mounts:
        assert "docker.sock" not in mount.get("Source", "") + mount.get("Destination", ""), mount
        assert not str(mount.get("Source", "")).startswith("/sys/fs/cgroup"), f"the host's cgroups are mounted: {mount}"
    assert host["Devices"] in (None, []), host["Devices"]
    assert host["PidMode"] in ("", "private") and host["NetworkMode"] != "host", (host["PidMode"], host["NetworkMode"])
    # and from inside: no Docker socket anywhere the usual clients look
    probe = service.docker("exec", service.container, "sh", "-c",
                           "for s in /var/run/docker.sock /run/docker.sock; do [ -S $s ] && echo $s; done; true")
    assert probe.stdout.strip() == "", f"a Docker socket is reachable in the container: {probe.stdout}"


def _container_cgroup_dirs(service: ComposeProject) -> list[Path]:
    """The host directories of the container's own cgroup (memory controller, or v2)."""
    pid = service.inspect()["State"]["Pid"]
    dirs = []
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "memory":
            dirs.append(Path("/sys/fs/cgroup/memory") / path.lstrip("/"))
        elif controllers == "" and Path("/sys/fs/cgroup/cgroup.controllers").exists():
            here = Path("/sys/fs/cgroup") / path.lstrip("/")
            dirs.append(here.parent if here.name == "init" else here)  # the entry point's leaf
    return dirs


def test_sandbox_cgroups_live_below_the_container(service: ComposeProject) -> None:
    run(service, "def main():\n    return 1\n")  # the pool has refilled behind it
    dirs = _container_cgroup_dirs(service)
    assert dirs, "the container's cgroup was not found"
    for parent in dirs:
        sandboxes = [p for p in parent.glob("execbox*/*") if p.is_dir()]
        assert sandboxes, f"no sandbox cgroup below the container's {parent}: {sorted(parent.iterdir())}"


def test_zz_stop_destroys_every_sandbox(service: ComposeProject) -> None:
    """Last: SIGTERM through tini; execbox shuts down having removed its sandboxes, so Docker
    can remove the container's cgroup (it cannot while a sandbox cgroup is left in it)."""
    dirs = _container_cgroup_dirs(service)
    started = time.monotonic()
    service("stop", "--timeout", "30", timeout_s=90)
    took_s = time.monotonic() - started
    state = service.inspect()["State"]
    # uvicorn re-raises SIGTERM once it has shut down cleanly: 143 (128 + 15) through tini
    assert state["ExitCode"] in (0, 143), f"exit code {state['ExitCode']} on SIGTERM:\n{service.logs()}"
    assert "Application shutdown complete" in service.logs(), service.logs()
    assert not state["OOMKilled"]
    assert took_s < 25, f"stopping took {took_s:.1f} s: SIGTERM did not reach execbox?"
    left = [p for p in dirs if p.exists()]
    assert not left, f"cgroups left after stop: {[sorted(p.glob('execbox*/*')) for p in left]}"


def test_the_image_is_lean_and_holds_no_build_secrets(docker_engine: Docker, execbox_image: str) -> None:
    config = docker_engine.inspect(execbox_image)["Config"]
    env = dict(item.split("=", 1) for item in config["Env"])
    for name in ("NODE_EXTRA_CA_CERTS", "PIP_CERT", "EXTRA_CA_CERTS", "PIP_FIND_LINKS", "PIP_INDEX_URL"):
        assert name not in env, f"{name} is set in the image"
    missing = docker_engine(
        "run", "--rm", "--network=none", "--entrypoint", "sh", execbox_image, "-c",
        "for c in npm gcc cc make pip pip3 curl apt-get; do command -v $c >/dev/null || echo $c; done; "
        "ls /var/lib/execbox/runtimes/python/bin/pip /usr/local/share/ca-certificates/build-extra-ca.crt /wheels 2>/dev/null; true",
    ).stdout.split()
    # apt-get stays (Debian base); npm and the service venv's pip install packages per request
    # (SANDBOX_PACKAGES), outside the sandboxes; compilers, curl and the sandboxes' pip are not there
    assert sorted(missing) == sorted(["gcc", "cc", "make", "curl"]), missing
    size_mb = int(docker_engine("image", "inspect", "--format", "{{.Size}}", execbox_image).stdout) / 1e6
    assert size_mb < 600, f"the image grew to {size_mb:.0f} MB (485 MB when the README said so)"
    tests_left = docker_engine(
        "run", "--rm", "--network=none", "--entrypoint", "sh", execbox_image, "-c",
        "find /var/lib/execbox/runtimes/python/lib -type d -name tests -path '*site-packages/*/tests' | head -3",
    ).stdout.split()
    assert not tests_left, f"packages' test suites are in the image: {tests_left}"


def test_egress_sandboxes_start_on_namespaces(compose_project: Any) -> None:
    """With egress, a namespaces sandbox's loopback is brought up by the fork server: the
    compose file's capabilities allow it (NET_ADMIN), so the pools fill and programs run."""
    project: ComposeProject = compose_project("egress", {
        "SANDBOX_BACKEND": "namespaces",
        "SANDBOX_EGRESS_ALLOW": "pypi.org",
        "SANDBOX_CODE_CHECK": "off",
        "SANDBOX_EXECUTOR_MANAGER_POOL_SIZE": "1",
    })  # fmt: skip
    try:
        project.up()
        project.wait_healthy()
        answer = run(project, "import os\ndef main():\n    return os.environ.get('HTTPS_PROXY', '')\n")
        assert answer["exit_code"] == 0, answer
        assert "127.0.0.1" in answer["stdout"] + json.dumps(answer), answer
        node = run(project, "function main() { return process.env.HTTPS_PROXY || ''; }", "nodejs")
        assert node["exit_code"] == 0, node
    finally:
        project.down()
