"""Escape: resource bombs stay inside the sandbox's limits (memory, disk, files).

All run with the server's default limits (256 MiB memory, 64 MiB disk per tmpfs).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from execbox.models import ResourceLimitType, Status

if TYPE_CHECKING:
    from tests.conftest import SandboxRunner

#: what a backend may add to the program's own memory (gVisor's sentry is charged too)
BACKEND_OVERHEAD_BYTES = 128 << 20
DISK_FULL_ERRNOS = {"ENOSPC", "EFBIG", "EDQUOT"}


def test_memory_bomb_is_killed_at_the_limit(executor: SandboxRunner) -> None:
    result = executor.run(
        """
        def main():
            print("bombing", flush=True)
            keep = []
            while True:
                keep.append(bytearray(b"\\xff" * (16 << 20)))
        """
    )
    assert result.status is Status.RESOURCE_LIMIT_EXCEEDED, executor.describe(result)
    assert result.resource_limit_type is ResourceLimitType.MEMORY
    assert result.exit_code == -137
    assert result.stdout == "bombing\n"
    assert result.memory_used_kb is not None
    assert result.memory_used_kb * 1024 <= executor.settings.max_memory + BACKEND_OVERHEAD_BYTES
    executor.assert_still_works(("python", "nodejs"))


def test_memory_bomb_spread_over_processes_is_killed(executor: SandboxRunner) -> None:
    # each process stays below the limit; together they are far above it
    result = executor.run(
        """
        import os, time

        def main():
            children = []
            for _ in range(6):
                pid = os.fork()
                if pid == 0:
                    try:
                        block = b"\\x01" * (100 << 20)
                        time.sleep(2)
                    finally:
                        os._exit(0)
                children.append(pid)
            return [os.waitpid(pid, 0)[1] for pid in children]
        """,
        limits=executor.limits(wall_time_s=8.0),
    )
    assert result.status is Status.RESOURCE_LIMIT_EXCEEDED, executor.describe(result)
    assert result.resource_limit_type is ResourceLimitType.MEMORY, executor.describe(result)
    assert result.exit_code == -137
    assert result.memory_used_kb is not None
    assert result.memory_used_kb * 1024 <= executor.settings.max_memory + BACKEND_OVERHEAD_BYTES
    executor.assert_still_works()


def test_nodejs_memory_bomb_is_contained(executor: SandboxRunner) -> None:
    result = executor.run(
        """
        function main() {
          const keep = [];
          for (;;) keep.push(new Array(1 << 20).fill(1.5));
        }
        """,
        "nodejs",
    )
    # killed by the cgroup, or V8's own heap limit: both are a memory verdict or a crash
    assert result.status in (Status.RESOURCE_LIMIT_EXCEEDED, Status.RUNTIME_ERROR, Status.PROGRAM_ERROR), (
        executor.describe(result)
    )
    if result.status is Status.RESOURCE_LIMIT_EXCEEDED:
        assert result.resource_limit_type is ResourceLimitType.MEMORY
    assert result.memory_used_kb is None or (
        result.memory_used_kb * 1024 <= executor.settings.max_memory + BACKEND_OVERHEAD_BYTES
    )
    executor.assert_still_works(("python", "nodejs"))


def test_disk_fill_stops_at_the_size_cap(executor: SandboxRunner) -> None:
    result = executor.run(
        """
        import errno, os

        def fill(directory):
            written, index, error = 0, 0, None
            try:
                while True:
                    with open(os.path.join(directory, f"fill-{index}"), "wb") as fh:
                        for _ in range(8):
                            fh.write(b"\\0" * (1 << 20))
                            written += 1 << 20
                    index += 1
            except OSError as exc:
                error = errno.errorcode.get(exc.errno, str(exc.errno))
            for i in range(index + 1):  # free the memory a tmpfs holds before the next one
                try:
                    os.unlink(os.path.join(directory, f"fill-{i}"))
                except OSError:
                    pass
            return [written, error]

        def main():
            return {d: fill(d) for d in ("/workspace", ".", "/tmp", "/dev/shm")}
        """,
        limits=executor.limits(wall_time_s=10.0),
    )
    assert result.status is Status.SUCCESS, executor.describe(result)
    cap = executor.settings.max_disk
    for directory, (written, error) in result.result.value.items():  # type: ignore[union-attr]
        assert error in DISK_FULL_ERRNOS, f"filling {directory} ended with {error} after {written} bytes"
        assert written <= cap + (1 << 20), f"{directory} took {written} bytes, above the {cap}-byte cap"
    executor.assert_still_works(("python", "nodejs"))


def test_one_huge_file_hits_a_limit(executor: SandboxRunner) -> None:
    result = executor.run(
        """
        import errno

        def main():
            written = 0
            try:
                with open("big.bin", "wb") as fh:
                    while True:
                        fh.write(b"\\0" * (4 << 20))
                        written += 4 << 20
            except OSError as exc:
                return [written, errno.errorcode.get(exc.errno)]
        """
    )
    assert result.status is Status.SUCCESS, executor.describe(result)
    written, error = result.result.value  # type: ignore[union-attr]
    assert error in DISK_FULL_ERRNOS
    assert written <= executor.settings.max_disk + (1 << 20)
    executor.assert_still_works()


def test_open_file_exhaustion_is_contained(executor: SandboxRunner) -> None:
    result = executor.run(
        """
        import errno, os

        def main():
            fds = []
            try:
                while True:
                    fds.append(os.open("/dev/null", os.O_RDONLY))
            except OSError as exc:
                return [len(fds), errno.errorcode.get(exc.errno)]
        """
    )
    assert result.status is Status.SUCCESS, executor.describe(result)
    opened, error = result.result.value  # type: ignore[union-attr]
    assert error == "EMFILE"
    assert opened < 1 << 16
    executor.assert_still_works()
