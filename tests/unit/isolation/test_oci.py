"""The OCI config builder and the Docker -> OCI seccomp translation of the gvisor backend.

Pure: no runsc, no root. The channel shell is run on the host with /bin/sh.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from execbox.isolation.base import Mount, SandboxSpec
from execbox.isolation.oci import (
    CHANNEL_SHELL,
    SeccompProfileError,
    build_config,
    docker_profile_to_oci,
    load_docker_profile,
    make_mount_points,
    prepare_rootfs,
    probe_config,
)
from execbox.isolation.rootfs import Op, PlanStep, mount_plan, publish_etc, system_steps
from execbox.isolation.seccomp import KILLED_SYSCALLS
from execbox.runtimes import CONTROL_FD_ENV, EVENTS_FD_ENV, get_runtime

PROFILE = Path(__file__).resolve().parents[3] / "execbox" / "seccomp-profile-default.json"


def _spec(language: str = "python", **overrides: object) -> SandboxSpec:
    values: dict[str, object] = {
        "runtime": get_runtime(language),
        "runtime_env_dir": Path("/srv/runtimes") / language,
        "memory_bytes": 256 << 20,
        "wall_time_s": 10.0,
        "pids_max": 128,
        "cpus": 0.5,
        "workspace_bytes": 32 << 20,
        "tmp_bytes": 16 << 20,
        "output_bytes": 1 << 20,
        "env": {"PATH": "/usr/bin:/bin", "HOME": "/tmp"},
    }
    values.update(overrides)
    return SandboxSpec(**values)  # type: ignore[arg-type]


def _config(spec: SandboxSpec | None = None, **overrides: object) -> dict:
    values: dict[str, object] = {
        "uid": 65534,
        "rootfs": Path("/state/gvisor/rootfs"),
        "workspace_dir": Path("/state/gvisor/work/gv-1"),
        "cgroups_path": "/execbox-gvisor-x/gv-1",
        "memory_limit_bytes": 320 << 20,
        "pids_limit": 1024,
    }
    values.update(overrides)
    spec = spec or _spec()
    values.setdefault("plan", mount_plan(spec, Path("/state/gvisor/etc")))
    return build_config(spec, **values)  # type: ignore[arg-type]


def _mount(config: dict, target: str) -> dict:
    found = [m for m in config["mounts"] if m["destination"] == target]
    assert len(found) == 1, f"{target} mounted {len(found)} times"
    return found[0]


# -- build_config ----------------------------------------------------------------------


def test_process_is_unprivileged_and_limited() -> None:
    process = _config()["process"]
    assert process["user"] == {"uid": 65534, "gid": 65534, "additionalGids": []}
    assert process["noNewPrivileges"] is True
    assert all(caps == [] for caps in process["capabilities"].values())
    assert set(process["capabilities"]) == {"bounding", "effective", "inheritable", "permitted", "ambient"}
    assert process["cwd"] == "/workspace"
    assert process["terminal"] is False
    limits = {r["type"]: (r["soft"], r["hard"]) for r in process["rlimits"]}
    assert limits == {
        "RLIMIT_CORE": (0, 0),
        "RLIMIT_FSIZE": (64 << 20, 64 << 20),
        "RLIMIT_NOFILE": (256, 256),
        "RLIMIT_NPROC": (128, 128),
    }


def test_root_is_read_only_and_every_bind_but_the_workspace_is_read_only() -> None:
    config = _config()
    assert config["root"] == {"path": "/state/gvisor/rootfs", "readonly": True}
    for mount in config["mounts"]:
        if mount["type"] != "bind":
            continue
        writable = mount["destination"] == "/workspace"
        assert ("rw" in mount["options"]) is writable, mount
        assert ("ro" in mount["options"]) is not writable, mount
        assert {"nosuid", "nodev"} <= set(mount["options"]), mount


def test_mounts_of_the_spec() -> None:
    config = _config()
    assert _mount(config, "/usr")["source"] == "/usr"
    assert _mount(config, "/etc")["source"] == "/state/gvisor/etc"
    assert _mount(config, "/workspace")["source"] == "/state/gvisor/work/gv-1"
    assert _mount(config, "/opt/runtime")["source"] == "/srv/runtimes/python"
    driver = _mount(config, "/opt/driver/driver.py")
    assert driver["source"].endswith("execbox/runtimes/python/driver.py")
    assert _mount(config, "/proc")["type"] == "proc"
    for target in ("/tmp", "/dev/shm"):
        tmpfs = _mount(config, target)
        assert tmpfs["type"] == "tmpfs"
        assert f"size={16 << 20}" in tmpfs["options"]
        assert "mode=1777" in tmpfs["options"]


def test_mounts_follow_the_plan_in_its_order() -> None:
    spec = _spec()
    plan = mount_plan(spec, Path("/state/etc"))
    targets = [m["destination"] for m in _config(spec, plan=plan)["mounts"]]
    assert targets == [step.target for step in plan if step.op is not Op.SYMLINK]
    assert targets.index("/etc") < min((targets.index(t) for t in targets if t.startswith("/etc/")), default=99)
    assert targets.index("/dev") < targets.index("/dev/shm")
    extra = PlanStep.bind("/state/egress/gv-1", "/run/egress")
    assert _config(spec, plan=[*plan, extra])["mounts"][-1]["destination"] == "/run/egress"


def test_extra_mounts_keep_their_mode() -> None:
    spec = _spec(mounts=(Mount(Path("/data/in"), "/data"), Mount(Path("/data/out"), "/out", writable=True)))
    config = _config(spec)
    assert "ro" in _mount(config, "/data")["options"]
    assert "rw" in _mount(config, "/out")["options"]


def test_driver_starts_behind_the_channel_shell_with_its_channel_fds() -> None:
    config = _config(_spec("nodejs"))
    args = config["process"]["args"]
    assert tuple(args[: len(CHANNEL_SHELL)]) == CHANNEL_SHELL
    assert args[len(CHANNEL_SHELL) :] == get_runtime("nodejs").argv()
    env = dict(item.split("=", 1) for item in config["process"]["env"])
    assert env[CONTROL_FD_ENV] == "3"
    assert env[EVENTS_FD_ENV] == "4"
    assert env["PATH"] == "/usr/bin:/bin"


def test_linux_section_limits_cgroup_and_namespaces() -> None:
    linux = _config()["linux"]
    assert linux["cgroupsPath"] == "/execbox-gvisor-x/gv-1"
    assert linux["resources"]["memory"] == {"limit": 320 << 20, "swap": 320 << 20}
    assert linux["resources"]["pids"] == {"limit": 1024}
    assert linux["resources"]["cpu"] == {"quota": 50_000, "period": 100_000}
    assert {n["type"] for n in linux["namespaces"]} >= {"pid", "network", "ipc", "uts", "mount"}
    assert "seccomp" not in linux


def test_seccomp_section_is_copied_in_when_given() -> None:
    section = {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": []}
    assert _config(seccomp=section)["linux"]["seccomp"] == section


def test_config_is_json() -> None:
    json.dumps(_config())


# -- the channel shell, for real -------------------------------------------------------


def test_channel_shell_moves_the_stdin_socket_to_fds_3_and_4(tmp_path: Path) -> None:
    probe = (
        "import os, stat\n"
        "assert stat.S_ISSOCK(os.fstat(3).st_mode) and stat.S_ISSOCK(os.fstat(4).st_mode)\n"
        "assert os.read(0, 1) == b''  # stdin is /dev/null\n"
        "assert os.read(3, 4) == b'ping'\n"
        "os.write(4, b'pong')\n"
    )
    host, child = socket.socketpair()
    with host, child:
        process = subprocess.Popen([*CHANNEL_SHELL, sys.executable, "-c", probe], stdin=child, cwd=tmp_path)
        child.close()
        host.sendall(b"ping")
        host.settimeout(30)
        assert host.recv(4) == b"pong"
        assert process.wait(timeout=30) == 0


# -- seccomp translation ----------------------------------------------------------------


def test_shipped_profile_is_a_docker_deny_list_mirroring_the_builtin_filter() -> None:
    profile = load_docker_profile(PROFILE)
    assert profile["defaultAction"] == "SCMP_ACT_ALLOW"
    killed = {n for r in profile["syscalls"] if r["action"] == "SCMP_ACT_KILL_PROCESS" for n in r["names"]}
    assert killed == set(KILLED_SYSCALLS) | {"clone"}
    enosys = [r for r in profile["syscalls"] if r.get("errnoRet") == errno.ENOSYS]
    assert {n for r in enosys for n in r["names"]} == {"io_uring_setup", "io_uring_enter", "io_uring_register", "clone3"}


def test_shipped_profile_translates_for_this_runsc() -> None:
    section, notes = docker_profile_to_oci(load_docker_profile(PROFILE), machine="x86_64")
    assert section["defaultAction"] == "SCMP_ACT_ALLOW"
    assert section["architectures"] == ["SCMP_ARCH_X86_64"]
    actions = {r["action"] for r in section["syscalls"]}
    assert actions == {"SCMP_ACT_TRAP"}  # KILL_PROCESS is unknown to this runsc
    names = {n for r in section["syscalls"] for n in r["names"]}
    assert set(KILLED_SYSCALLS) <= names
    assert "clone3" not in names  # ENOSYS rules dropped, the sentry answers ENOSYS itself
    clone_rules = [r for r in section["syscalls"] if r["names"] == ["clone"]]
    assert len(clone_rules) == 7
    assert all(r["args"][0]["op"] == "SCMP_CMP_MASKED_EQ" for r in clone_rules)
    assert any("SCMP_ACT_TRAP" in note for note in notes)
    assert any("ENOSYS" in note for note in notes)
    json.dumps(section)


def test_arch_map_picks_the_host_machine() -> None:
    profile = load_docker_profile(PROFILE)
    section, _ = docker_profile_to_oci(profile, machine="aarch64")
    assert section["architectures"] == ["SCMP_ARCH_AARCH64"]
    with pytest.raises(SeccompProfileError):
        docker_profile_to_oci(profile, machine="mips")


def test_errno_other_than_eperm_or_enosys_is_refused_not_changed() -> None:
    profile = {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["socket"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EAFNOSUPPORT}]}
    with pytest.raises(SeccompProfileError, match="errnoRet"):
        docker_profile_to_oci(profile, machine="x86_64")


def test_eperm_rules_and_args_are_kept() -> None:
    args = [{"index": 0, "value": 1, "op": "SCMP_CMP_NE"}]
    profile = {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["socket"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EPERM, "args": args, "comment": "x"},
        {"name": "mkdir", "action": "SCMP_ACT_ERRNO"},
    ]}
    section, notes = docker_profile_to_oci(profile, machine="x86_64")
    assert section["syscalls"] == [
        {"names": ["socket"], "action": "SCMP_ACT_ERRNO", "args": args},
        {"names": ["mkdir"], "action": "SCMP_ACT_ERRNO"},
    ]
    assert notes == []


def test_includes_and_excludes_follow_docker() -> None:
    profile = {"defaultAction": "SCMP_ACT_ERRNO", "architectures": ["SCMP_ARCH_X86_64"], "syscalls": [
        {"names": ["read"], "action": "SCMP_ACT_ALLOW"},
        {"names": ["mount"], "action": "SCMP_ACT_ALLOW", "includes": {"caps": ["CAP_SYS_ADMIN"]}},
        {"names": ["arch_prctl"], "action": "SCMP_ACT_ALLOW", "includes": {"arches": ["amd64"]}},
        {"names": ["arm_only"], "action": "SCMP_ACT_ALLOW", "includes": {"arches": ["arm64"]}},
        {"names": ["not_here"], "action": "SCMP_ACT_ALLOW", "excludes": {"arches": ["amd64"]}},
    ]}
    section, _ = docker_profile_to_oci(profile, machine="x86_64")
    assert [r["names"] for r in section["syscalls"]] == [["read"], ["arch_prctl"]]
    assert section["architectures"] == ["SCMP_ARCH_X86_64"]


def test_unknown_action_and_default_errno_are_refused() -> None:
    with pytest.raises(SeccompProfileError, match="SCMP_ACT_NOTIFY"):
        docker_profile_to_oci({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
            {"names": ["read"], "action": "SCMP_ACT_NOTIFY"}]}, machine="x86_64")
    with pytest.raises(SeccompProfileError, match="defaultErrnoRet"):
        docker_profile_to_oci({"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": errno.ENOSYS}, machine="x86_64")


def test_load_refuses_what_is_not_a_profile(tmp_path: Path) -> None:
    with pytest.raises(SeccompProfileError, match="cannot read"):
        load_docker_profile(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(SeccompProfileError, match="cannot read"):
        load_docker_profile(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text('{"syscalls": []}')
    with pytest.raises(SeccompProfileError, match="defaultAction"):
        load_docker_profile(tmp_path / "other.json")


def test_probe_forbids_uname_on_top_of_the_profile() -> None:
    plain = probe_config(Path("/rootfs"), 65534, None)
    assert plain["process"]["args"] == ["/usr/bin/uname"]
    # the host's programs, as every plan has them (the links are in the root skeleton)
    assert [m["destination"] for m in plain["mounts"]] == [s.target for s in system_steps() if s.op is not Op.SYMLINK]
    assert "seccomp" not in plain["linux"]
    section = {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["ptrace"], "action": "SCMP_ACT_TRAP"}]}
    checked = probe_config(Path("/rootfs"), 65534, section)
    rules = checked["linux"]["seccomp"]["syscalls"]
    assert rules[0] == section["syscalls"][0]
    assert rules[-1] == {"names": ["uname"], "action": "SCMP_ACT_ERRNO"}
    assert section["syscalls"] == [{"names": ["ptrace"], "action": "SCMP_ACT_TRAP"}]  # not mutated
    assert os.fspath(Path(checked["root"]["path"])) == "/rootfs"


# -- the root skeleton -------------------------------------------------------------------


def test_the_root_skeleton_holds_the_mount_points_and_links_of_the_plan(tmp_path: Path) -> None:
    etc = publish_etc(tmp_path, 60001, 4)
    rootfs = prepare_rootfs(tmp_path)
    assert rootfs == tmp_path / "rootfs"
    assert (rootfs / "opt" / "execbox" / "zygote.py").is_file() and (rootfs / "run" / "export").is_dir()
    env = tmp_path / "env"
    env.mkdir()
    plan = mount_plan(_spec(runtime_env_dir=env), etc)
    make_mount_points(rootfs, plan)
    for target in ("usr", "etc", "proc", "dev", "tmp", "workspace", "opt/runtime"):
        assert (rootfs / target).is_dir(), target
    assert (rootfs / "opt" / "driver" / "driver.py").is_file()
    for name in ("bin", "lib", "lib64", "sbin"):
        host = Path("/", name)
        if host.is_symlink():
            assert os.readlink(rootfs / name) == os.readlink(host)
    # what is mounted inside an earlier mount is that mount's business (the minimal /etc's, /dev's)
    assert not (rootfs / "dev" / "shm").exists()
    assert not any((rootfs / "etc").iterdir())
    for name in ("ssl", "alternatives", "fonts"):
        assert (etc / name).is_dir()  # the minimal /etc holds the mount points of its host dirs
    passwd = (etc / "passwd").read_text()
    assert "sandbox0:x:60001:60001:" in passwd and "sandbox3:x:60004:60004:" in passwd
    assert "nobody:x:65534:65534:" in passwd
    assert (etc / "group").read_text().endswith("nogroup:x:65534:\n")
    assert not (etc / "shadow").exists()
    assert publish_etc(tmp_path, 60001, 4) == etc  # published once, by content
    assert prepare_rootfs(tmp_path) == rootfs  # idempotent, in place
    make_mount_points(rootfs, plan)


def test_make_mount_points_for_the_driver_and_extra_mounts(tmp_path: Path) -> None:
    rootfs = prepare_rootfs(tmp_path)
    source_dir = tmp_path / "data"
    source_dir.mkdir()
    (source_dir / "hosts").write_text("x")
    spec = _spec("nodejs", mounts=(Mount(source_dir, "/data/in"), Mount(tmp_path / "data" / "hosts", "/srv/hosts")))
    make_mount_points(rootfs, mount_plan(spec, publish_etc(tmp_path, 60001, 4)))
    assert (rootfs / "opt" / "driver" / "driver.js").is_file()
    assert (rootfs / "opt" / "execbox" / "zygote.py").is_file()
    assert (rootfs / "data" / "in").is_dir()
    assert (rootfs / "srv" / "hosts").is_file()
