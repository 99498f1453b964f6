"""Policy -> spec: the SandboxSpec every sandbox of a runtime gets, from Settings."""

from __future__ import annotations

import os

from execbox.isolation.base import EgressPorts, SandboxSpec
from execbox.runtimes import Runtime
from execbox.service.backends import SECCOMP_PROFILE
from execbox.settings import Settings

__all__ = ["PASSED_HOST_VARIABLES", "sandbox_spec"]

#: host variables passed into sandboxes (CPU-model workarounds for OpenBLAS; never secrets)
PASSED_HOST_VARIABLES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def sandbox_spec(settings: Settings, runtime: Runtime, egress: EgressPorts | None = None) -> SandboxSpec:
    """The spec of every sandbox of ``runtime``; with ``egress`` (the proxy, when the server
    has an allowlist) each gets a port of it."""
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": "/tmp",
        "TMPDIR": "/tmp",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "OPENBLAS_NUM_THREADS": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        **dict(runtime.env),
    }
    env.update({k: os.environ[k] for k in PASSED_HOST_VARIABLES if k in os.environ})
    return SandboxSpec(
        runtime=runtime,
        runtime_env_dir=runtime.env_dir(settings.runtime_dir),
        memory_bytes=settings.max_memory,
        wall_time_s=settings.timeout,
        pids_max=settings.max_pids,
        cpus=settings.cpus,
        workspace_bytes=settings.max_disk,
        tmp_bytes=settings.max_disk,
        output_bytes=settings.max_output,
        egress=egress,
        seccomp_profile=SECCOMP_PROFILE if settings.enable_seccomp else None,
        file_size_max_bytes=settings.max_disk,
        env=env,
        preload_modules=settings.preload_modules if runtime.preload else (),
    )
