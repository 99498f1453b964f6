"""Contract: time, memory and output limits give docs/api.md's verdicts, keeping partial output.

Limits are lowered per request (within the server's maxima) rather than with a new Executor.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from execbox.models import ResourceLimitType, Status

if TYPE_CHECKING:
    from tests.conftest import SandboxRunner

SHORT_WALL_S = 2.0
SMALL_MEMORY_BYTES = 96 << 20
SMALL_OUTPUT_BYTES = 64 << 10


def test_time_limit_python(executor: SandboxRunner) -> None:
    result = executor.run(
        """
        import sys

        def main():
            print("started")
            sys.stdout.flush()
            print("partial stderr", file=sys.stderr, flush=True)
            while True:
                pass
        """,
        limits=executor.limits(wall_time_s=SHORT_WALL_S),
    )
    assert result.status is Status.RESOURCE_LIMIT_EXCEEDED, executor.describe(result)
    assert result.resource_limit_type is ResourceLimitType.TIME
    assert result.exit_code == -124
    assert "Execution timeout" in result.stderr
    assert result.stdout == "started\n"
    assert "partial stderr" in result.stderr
    assert result.time_used_ms is not None and result.time_used_ms >= SHORT_WALL_S * 1000 * 0.9
    executor.assert_still_works()


def test_time_limit_python_sleeping(executor: SandboxRunner) -> None:
    result = executor.run(
        "import time\ndef main():\n    print('zz', flush=True)\n    time.sleep(3600)\n",
        limits=executor.limits(wall_time_s=SHORT_WALL_S),
    )
    assert result.status is Status.RESOURCE_LIMIT_EXCEEDED, executor.describe(result)
    assert result.resource_limit_type is ResourceLimitType.TIME
    assert result.exit_code == -124
    assert result.stdout == "zz\n"


def test_time_limit_nodejs(executor: SandboxRunner) -> None:
    result = executor.run(
        "function main() { console.log('started'); while (true) {} }",
        "nodejs",
        limits=executor.limits(wall_time_s=SHORT_WALL_S),
    )
    assert result.status is Status.RESOURCE_LIMIT_EXCEEDED, executor.describe(result)
    assert result.resource_limit_type is ResourceLimitType.TIME
    assert result.exit_code == -124
    assert "Execution timeout" in result.stderr
    assert result.stdout == "started\n"


def test_memory_limit_is_an_oom_kill(executor: SandboxRunner) -> None:
    # allocated in touched 8 MiB chunks: the cgroup kills it, it never sees MemoryError
    result = executor.run(
        """
        def main():
            print("allocating", flush=True)
            keep = []
            while True:
                keep.append(b"\\x01" * (8 << 20))
        """,
        limits=executor.limits(memory_bytes=SMALL_MEMORY_BYTES),
    )
    assert result.status is Status.RESOURCE_LIMIT_EXCEEDED, executor.describe(result)
    assert result.resource_limit_type is ResourceLimitType.MEMORY
    assert result.exit_code == -137
    assert "Memory limit exceeded (killed by OOM)" in result.stderr
    assert result.stdout == "allocating\n"
    assert result.memory_used_kb is not None and result.memory_used_kb > 0
    executor.assert_still_works(("python", "nodejs"))


def test_memory_limit_nodejs(executor: SandboxRunner) -> None:
    result = executor.run(
        """
        function main() {
          console.log('allocating');
          const keep = [];
          while (true) keep.push(Buffer.alloc(8 << 20, 1));
        }
        """,
        "nodejs",
        limits=executor.limits(memory_bytes=SMALL_MEMORY_BYTES),
    )
    assert result.status is Status.RESOURCE_LIMIT_EXCEEDED, executor.describe(result)
    assert result.resource_limit_type is ResourceLimitType.MEMORY
    assert result.exit_code == -137
    assert "Memory limit exceeded (killed by OOM)" in result.stderr
    assert result.stdout == "allocating\n"


def test_output_cap(executor: SandboxRunner) -> None:
    result = executor.run(
        """
        def main():
            n = 0
            while True:
                print(f"line {n:08d}")
                n += 1
        """,
        limits=executor.limits(output_bytes=SMALL_OUTPUT_BYTES),
    )
    assert result.status is Status.RESOURCE_LIMIT_EXCEEDED, executor.describe(result)
    assert result.resource_limit_type is ResourceLimitType.OUTPUT
    assert result.exit_code != 0
    assert result.stdout.startswith("line 00000000\nline 00000001\n")  # partial output kept
    assert 0 < len(result.stdout.encode()) <= SMALL_OUTPUT_BYTES
    executor.assert_still_works()


def test_output_cap_counts_stderr_too(executor: SandboxRunner) -> None:
    result = executor.run(
        "import sys\ndef main():\n    while True:\n        sys.stderr.write('e' * 1000 + '\\n')\n",
        limits=executor.limits(output_bytes=SMALL_OUTPUT_BYTES),
    )
    assert result.status is Status.RESOURCE_LIMIT_EXCEEDED, executor.describe(result)
    assert result.resource_limit_type is ResourceLimitType.OUTPUT
    assert result.stderr.startswith("e" * 1000 + "\n")


def test_output_just_under_the_cap_is_kept_whole(executor: SandboxRunner) -> None:
    result = executor.run(
        "def main():\n    print('x' * 1000)\n",
        limits=executor.limits(output_bytes=SMALL_OUTPUT_BYTES),
    )
    assert result.status is Status.SUCCESS, executor.describe(result)
    assert result.stdout == "x" * 1000 + "\n"
