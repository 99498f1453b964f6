"""The deployment files agree with the code and with each other (no Docker needed).

* every setting execbox has reaches the container from ``.env`` / the environment of
  ``docker compose`` (a setting missing from the compose file would be silently ignored);
* RAGFlow's override runs the service exactly as docker-compose.yml does: same capabilities
  and security options, not privileged, no Docker socket;
* the systemd unit runs ``execbox serve`` from the clone's venv, as root, restarting.

The files are read as text (block lists under a key): the suite needs no YAML library.
"""

from __future__ import annotations

import configparser
import re
from pathlib import Path

from execbox.settings import Settings

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
RAGFLOW_OVERRIDE = REPO / "docker" / "docker-compose.ragflow.yml"
UNIT = REPO / "contrib" / "systemd" / "execbox.service"
#: fixed by docker-compose.yml inside the container, never taken from .env
FIXED_IN_CONTAINER = {"SANDBOX_BIND_HOST", "SANDBOX_EXECUTOR_MANAGER_PORT", "SANDBOX_STATE_DIR"}


def block_list(text: str, key: str) -> list[str]:
    """The items of the first block list ``key:`` in ``text`` (comments dropped)."""
    lines = text.splitlines()
    for number, line in enumerate(lines):
        match = re.match(rf"^(\s*){re.escape(key)}:(.*)$", line)
        if match is None:
            continue
        indent = len(match.group(1))
        items = []
        for item in lines[number + 1 :]:
            stripped = item.split(" #")[0].rstrip()
            if not stripped.strip() or stripped.strip().startswith("#"):
                continue
            if len(item) - len(item.lstrip()) <= indent:
                break
            assert stripped.strip().startswith("- "), f"{key}: not a block list at {item!r}"
            items.append(stripped.strip()[2:].strip().strip("\"'"))
        return items
    raise AssertionError(f"no {key}: in the file")


def uncommented(path: Path) -> str:
    return "\n".join(line.split("#")[0] for line in path.read_text().splitlines())


def test_every_setting_reaches_the_container() -> None:
    environment = block_list(COMPOSE.read_text(), "environment")
    passed = {item for item in environment if "=" not in item}
    fixed = {item.split("=", 1)[0] for item in environment if "=" in item}
    settings = {f"SANDBOX_{name.upper()}" for name in Settings.model_fields}
    missing = settings - FIXED_IN_CONTAINER - passed
    assert not missing, (
        f"settings docker-compose.yml does not pass to the container: {sorted(missing)}; "
        "add each as `- NAME` under environment:"
    )
    assert fixed == {"SANDBOX_BIND_HOST", "SANDBOX_EXECUTOR_MANAGER_PORT"}, fixed
    assert "SANDBOX_BIND_HOST=0.0.0.0" in environment  # the container must listen on its interface


def test_compose_file_is_unprivileged_without_a_docker_socket() -> None:
    text = uncommented(COMPOSE)
    assert "privileged: true" not in text
    assert "docker.sock" not in text
    assert "/sys/fs/cgroup" not in text  # sandboxes use the container's own cgroup
    assert block_list(text, "cap_drop") == ["ALL"]
    assert "sandbox-executor-manager:" in text  # the host name RAGFlow calls


def test_ragflow_override_runs_the_service_as_docker_compose_yml_does() -> None:
    ours, override = COMPOSE.read_text(), RAGFLOW_OVERRIDE.read_text()
    assert block_list(override, "cap_add") == block_list(ours, "cap_add")
    assert block_list(override, "cap_drop") == ["ALL"]
    assert block_list(override, "security_opt") == block_list(ours, "security_opt")
    text = uncommented(RAGFLOW_OVERRIDE)
    assert re.search(r"^  sandbox-executor-manager:$", text, re.M), "RAGFlow's service name"
    assert "privileged: false" in text
    assert "volumes: !reset []" in text  # RAGFlow's base file mounts the Docker socket
    assert "security_opt: !override" in text
    assert "docker.sock" not in text
    environment = block_list(override, "environment")
    assert "SANDBOX_BIND_HOST=0.0.0.0" in environment and "SANDBOX_EXECUTOR_MANAGER_PORT=9385" in environment
    assert "curl" not in re.search(r"test: (.*)", text).group(1)  # the image has no curl


def test_systemd_unit_runs_the_service_from_the_clone() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string(UNIT.read_text())
    service = unit["Service"]
    assert service["ExecStart"].split()[:2] == ["@EXECBOX_DIR@/.venv/bin/execbox", "serve"], service["ExecStart"]
    assert service["WorkingDirectory"] == "@EXECBOX_DIR@"  # where execbox reads .env
    assert service.get("User", "root") == "root"  # the namespaces backend needs root
    assert service["Restart"] in ("on-failure", "always")
    assert service["KillSignal"] == "SIGTERM"
    assert int(service["TimeoutStopSec"]) >= 20
    assert unit["Install"]["WantedBy"] == "multi-user.target"
