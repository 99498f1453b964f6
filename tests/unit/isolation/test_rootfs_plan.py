"""One mount plan, every launcher: bwrap's argv, the zygote's mounts (the namespaces fork
server and the inner wall of two walls), the two-walls gVisor config and the single-use
gVisor config all give a sandbox the same targets, with the same sources, read-only-ness
and sizes, in the plan's order; /etc is the one published by ``publish_etc`` everywhere.

Pure: no root, no sandbox. The zygote's real ``_build_root`` runs against a temporary
directory with its mount(2) and pivot_root(2) recorded instead of made.
"""

from __future__ import annotations

import os
import types
from pathlib import Path

import pytest

from execbox.isolation import zygote
from execbox.isolation.base import Mount, SandboxSpec
from execbox.isolation.forkserver import ForkServer, host_view
from execbox.isolation.namespaces import bwrap_options
from execbox.isolation.oci import (
    build_config,
    build_host_config,
    make_mount_points,
    prepare_rootfs,
)
from execbox.isolation.rootfs import (
    Op,
    PlanStep,
    egress_step,
    guest_plan,
    mount_plan,
    publish_etc,
)
from execbox.runtimes import RUNTIME_MOUNT, WORKSPACE, get_runtime

#: target -> (kind, host source of a bind, writable (a bind or a tmpfs), size_bytes of a tmpfs)
View = list[tuple[str, tuple[str, str, bool, int]]]


@pytest.fixture
def setup(tmp_path: Path) -> tuple[SandboxSpec, Path, list[PlanStep]]:
    """A spec with every kind of step: extra mounts (a read-only dir, a writable dir, a
    file), and a sandbox's own egress step."""
    for name in ("env", "in", "out", "egress"):
        (tmp_path / name).mkdir()
    (tmp_path / "in" / "table.csv").write_text("a,b\n")
    spec = SandboxSpec(
        runtime=get_runtime("python"), runtime_env_dir=tmp_path / "env", memory_bytes=256 << 20, wall_time_s=10.0,
        pids_max=64, cpus=1.0, workspace_bytes=48 << 20, tmp_bytes=12 << 20, output_bytes=1 << 20,
        env={"PATH": "/usr/bin"},
        mounts=(Mount(tmp_path / "in", "/data"), Mount(tmp_path / "out", "/out", writable=True),
                Mount(tmp_path / "in" / "table.csv", "/srv/table.csv")),
    )  # fmt: skip
    etc = publish_etc(tmp_path / "state", 60001, 4)
    return spec, etc, [egress_step(tmp_path / "egress")]


def _expected(plan: list[PlanStep]) -> View:
    view: View = []
    for step in plan:
        if step.op is not Op.SYMLINK:
            kind = "bind" if step.is_bind else step.op.value
            view.append((step.target, (kind, step.source, step.writable, step.size_bytes)))
    return view


def _bwrap_view(argv: list[str]) -> tuple[View, dict[str, str]]:
    view: View = []
    links: dict[str, str] = {}
    args = iter(argv[argv.index("--unshare-all") : argv.index("--remount-ro")])
    size = 0
    for arg in args:
        if arg in ("--ro-bind", "--bind"):
            source, target = next(args), next(args)
            view.append((target, ("bind", source, arg == "--bind", 0)))
        elif arg == "--symlink":
            text, target = next(args), next(args)
            links[target] = text
        elif arg == "--size":
            size = int(next(args))
        elif arg == "--tmpfs":
            view.append((next(args), ("tmpfs", "", True, size)))
        elif arg in ("--proc", "--dev"):
            view.append((next(args), (arg[2:], "", False, 0)))
        elif arg == "--hostname":
            next(args)
    return view, links


def _zygote_view(
    wire: list[list[str]], root: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[View, dict[str, str]]:
    """Run the zygote's own ``_build_root`` under ``root``, recording its mounts."""
    calls: list[tuple[str | None, str, str | None, int, str | None]] = []
    monkeypatch.setattr(zygote, "_mount", lambda source, target, fstype, flags, data=None: calls.append(
        (source, target, fstype, flags, data)))  # fmt: skip
    monkeypatch.setattr(zygote, "_libc", types.SimpleNamespace(syscall=lambda *a: 0, umount2=lambda *a: 0))
    monkeypatch.setitem(zygote.SYSCALLS, "pivot_root", 155)
    root.mkdir()
    monkeypatch.chdir(root)  # _build_root changes directory: restored afterwards
    zygote._build_root(str(root), wire, os.getuid())
    view: dict[str, tuple[str, str, bool, int]] = {}
    devs: list[str] = []
    for source, target, fstype, flags, data in calls:
        if not target.startswith(f"{root}/"):
            continue
        inside = target.removeprefix(str(root))
        if flags & zygote.MS_BIND and source == f"/dev/{Path(inside).name}" and str(Path(inside).parent) in devs:
            continue  # a device node of a /dev
        options = dict(o.split("=", 1) for o in (data or "").split(",") if "=" in o)
        if flags & zygote.MS_REMOUNT and flags & zygote.MS_RDONLY:
            kind, bound, _, size = view[inside]
            view[inside] = (kind, bound, False, size)
        elif flags & zygote.MS_BIND:
            view[inside] = ("bind", str(source), True, 0)
        elif fstype == "proc":
            view[inside] = ("proc", "", False, 0)
        elif fstype == "tmpfs" and not flags & zygote.MS_NODEV:  # a /dev: device nodes work in it
            view[inside] = ("dev", "", False, 0)
            devs.append(inside)
        elif fstype == "tmpfs":
            view[inside] = ("tmpfs", "", True, int(options["size"]))
    links = {str(p).removeprefix(str(root)): os.readlink(p) for p in root.rglob("*") if p.is_symlink()}
    links = {target: text for target, text in links.items() if not any(target.startswith(f"{d}/") for d in devs)}
    return list(view.items()), links


def _oci_view(mounts: list[dict]) -> View:
    view: View = []
    for mount in mounts:
        options = mount.get("options", [])
        size = next((int(o[5:]) for o in options if o.startswith("size=")), 0)
        if mount["type"] == "bind":
            view.append((mount["destination"], ("bind", mount["source"], "rw" in options, 0)))
        elif mount["type"] == "proc":
            view.append((mount["destination"], ("proc", "", False, 0)))
        elif size:
            view.append((mount["destination"], ("tmpfs", "", "ro" not in options, size)))
        else:  # a tmpfs without a size is gVisor's /dev, filled by runsc with the usual devices
            view.append((mount["destination"], ("dev", "", False, 0)))
    return view


def _plan_links(plan: list[PlanStep]) -> dict[str, str]:
    return {step.target: step.source for step in plan if step.op is Op.SYMLINK}


def test_every_launcher_renders_the_same_plan(
    setup: tuple[SandboxSpec, Path, list[PlanStep]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec, etc, extra = setup
    plan = [*mount_plan(spec, etc), *extra]
    expected = _expected(plan)
    targets = [target for target, _ in expected]
    assert len(set(targets)) == len(targets)
    assert {"/usr", "/etc", "/proc", "/dev", "/tmp", "/dev/shm", WORKSPACE, RUNTIME_MOUNT, "/data", "/out"} <= set(targets)
    assert dict(expected)["/etc"] == ("bind", str(etc), False, 0)  # the one published /etc

    # bwrap, as the namespaces backend renders its options (the spec's plan, then the sandbox's own steps)
    fds = {"control_r": 3, "events_w": 4, "seccomp": 5, "info_w": 6, "block_r": 7}
    bwrap, bwrap_links = _bwrap_view(bwrap_options(spec, fds, plan))
    assert bwrap == expected
    assert bwrap_links == _plan_links(plan)

    # on the host both launchers build from the view: every read-only source at its target
    # (a directory as an overlay, a file copied), writable binds and links as they are, and
    # sandboxes that bind target to target (the guest plan)
    view, inner_plan = host_view(plan, tmp_path / "view", "/usr/bin/python3")
    viewed = {target: (op, source) for op, source, target in view["steps"]}
    for step in plan:
        if step.is_bind:
            kind = "rbind" if step.writable else ("overlay" if Path(step.source).is_dir() else "copy")
            assert viewed[step.target] == (kind, step.source), step
        elif step.op is Op.SYMLINK:
            assert viewed[step.target] == ("symlink", step.source)
    assert inner_plan == guest_plan(plan)

    # the zygote (the namespaces fork server): the spec's plan as sent at init, the spawn's own steps
    server = ForkServer(lambda fd: None, root_dir="/", plan=plan[: -len(extra)], seccomp_bpf=b"",  # type: ignore[arg-type, return-value]
                        env={}, loopback=False, preload="", driver=None)  # fmt: skip
    wire = server._config["plan"] + [step.wire() for step in extra]
    forked, forked_links = _zygote_view(wire, tmp_path / "forked", monkeypatch)
    assert forked == expected
    assert forked_links == _plan_links(plan)

    # single-use gVisor: the same mounts in the same order; the workspace is the host tmpfs
    # of the workspace's size (mounted by start_single_use), bound read-write
    workspace = tmp_path / "work" / "gv-1"
    single = build_config(
        spec, plan=plan, uid=65534, rootfs=tmp_path / "rootfs", workspace_dir=workspace, cgroups_path="/x/gv-1",
        memory_limit_bytes=1 << 30, pids_limit=1024,
    )  # fmt: skip
    single_view = _oci_view(single["mounts"])
    assert dict(single_view)[WORKSPACE] == ("bind", str(workspace), True, 0)
    single_view = [(t, ("tmpfs", "", True, spec.workspace_bytes) if t == WORKSPACE else m) for t, m in single_view]
    assert single_view == expected
    # its symlinks are in the read-only root skeleton, made from the same plan
    rootfs = prepare_rootfs(tmp_path / "gvisor")
    make_mount_points(rootfs, plan)
    skeleton_links = {f"/{p.name}": os.readlink(p) for p in rootfs.iterdir() if p.is_symlink()}
    assert skeleton_links == _plan_links(plan)

    # two walls: the outer wall binds every source of the plan at its target ...
    host = build_host_config(
        spec, plan=plan, rootfs=rootfs, zygote=tmp_path / "zygote.py", export_dir=tmp_path / "export",
        argv=["/usr/bin/python3"], env={}, cgroups_path="/x/gvh-1", memory_limit_bytes=1 << 30, pids_limit=1024,
    )  # fmt: skip
    outer = {t: m for t, m in _oci_view(host["mounts"]) if m[0] == "bind"}
    assert {t: m for t, m in outer.items() if not t.startswith(("/opt/execbox/", "/run/export"))} == {
        t: m for t, m in expected if m[0] == "bind"
    }
    # ... and the inner wall's zygote builds the guest plan inside it, from those targets
    inner, inner_links = _zygote_view([s.wire() for s in guest_plan(plan)], tmp_path / "inner", monkeypatch)
    assert all(m[1] == t for t, m in inner if m[0] == "bind")
    seen = [(t, (k, outer[t][1], w, n) if k == "bind" else (k, s, w, n)) for t, (k, s, w, n) in inner]
    assert seen == expected
    assert inner_links == _plan_links(plan)


def test_a_new_step_reaches_every_launcher(
    setup: tuple[SandboxSpec, Path, list[PlanStep]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step a sandbox adds (here a writable tmpfs and a read-only bind) shows up alike."""
    spec, etc, _ = setup
    extra = [PlanStep.tmpfs("/scratch", 3 << 20), PlanStep.bind(tmp_path / "in", "/ref")]
    plan = [*mount_plan(spec, etc), *extra]
    fds = {"control_r": 3, "events_w": 4, "seccomp": 5, "info_w": 6, "block_r": 7}
    bwrap, _ = _bwrap_view(bwrap_options(spec, fds, plan))
    forked, _ = _zygote_view([s.wire() for s in plan], tmp_path / "forked", monkeypatch)
    single = build_config(
        spec, plan=plan, uid=65534, rootfs=tmp_path / "rootfs", workspace_dir=tmp_path / "ws", cgroups_path="/x/1",
        memory_limit_bytes=1 << 30, pids_limit=1024,
    )  # fmt: skip
    for view in (bwrap, forked, _oci_view(single["mounts"])):
        assert dict(view)["/scratch"] == ("tmpfs", "", True, 3 << 20)
        assert dict(view)["/ref"] == ("bind", str(tmp_path / "in"), False, 0)
    rootfs = prepare_rootfs(tmp_path / "gvisor")
    make_mount_points(rootfs, plan)
    assert (rootfs / "scratch").is_dir() and (rootfs / "ref").is_dir()
