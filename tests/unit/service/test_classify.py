"""Verdict classification: every branch of execbox.service.classify, from raw RunOutcomes."""

from __future__ import annotations

import signal
from typing import Any

import pytest

from execbox.isolation.base import DriverReport, RunOutcome
from execbox.models import Artifact, ResourceLimitType, ResultValue, RuntimeErrorType, Status, UnauthorizedAccessType
from execbox.service.classify import (
    EXIT_BUSY,
    EXIT_INTERNAL,
    EXIT_OOM,
    EXIT_RATE_LIMITED,
    EXIT_TIMEOUT,
    EXIT_UNSAFE,
    classify,
    runner_error,
)

ARTIFACT = Artifact(name="a.csv", mime_type="text/csv", size=2, content=b"a\n")


def report(exit_code: int = 0, value: Any = None, present: bool = True, kind: str | None = None, time_ms: float | None = 12.5) -> DriverReport:
    result = {"present": True, "value": value} if present and exit_code == 0 else None
    return DriverReport(exit_code=exit_code, result=result, error_kind=kind, time_ms=time_ms)


def outcome(**fields: Any) -> RunOutcome:
    base: dict[str, Any] = {
        "stdout": b"out\n",
        "stderr": b"",
        "report": None,
        "exit_code": None,
        "signal": None,
        "wall_time_ms": 40.0,
        "memory_peak_bytes": 2048 * 1024,
        "cpu_time_ms": 7.0,
    }
    base.update(fields)
    return RunOutcome(**base)


def test_special_exit_codes_match_the_api() -> None:
    assert (EXIT_TIMEOUT, EXIT_OOM, EXIT_UNSAFE, EXIT_BUSY, EXIT_RATE_LIMITED, EXIT_INTERNAL) == (
        -124, -137, -999, -10, -429, -3,
    )


def test_success_with_a_result() -> None:
    result = classify(outcome(report=report(value={"x": [1, 2]})), wall_time_s=10, artifacts=(ARTIFACT,), backend="b")
    assert result.status is Status.SUCCESS
    assert result.exit_code == 0
    assert result.result == ResultValue(present=True, value={"x": [1, 2]})
    assert result.artifacts == (ARTIFACT,)
    assert result.stdout == "out\n"
    assert result.backend == "b"
    assert result.time_used_ms == 12.5  # the driver's own measure wins over the wall time
    assert result.memory_used_kb == 2048
    assert result.cpu_time_ms == 7.0
    assert result.resource_limit_type is None and result.unauthorized_access_type is None
    assert result.runtime_error_type is None


def test_success_without_a_result_value_reported() -> None:
    result = classify(outcome(report=DriverReport(0, None, None, None)), wall_time_s=10)
    assert result.status is Status.SUCCESS
    assert result.result is None
    assert result.time_used_ms == 40.0  # no driver time: the wall time


def test_success_with_a_null_value_is_present() -> None:
    result = classify(outcome(report=report(value=None)), wall_time_s=10)
    assert result.result == ResultValue(present=True, value=None)


def test_timeout() -> None:
    result = classify(outcome(stdout=b"partial", stderr=b"err", timed_out=True), wall_time_s=2.5)
    assert result.status is Status.RESOURCE_LIMIT_EXCEEDED
    assert result.resource_limit_type is ResourceLimitType.TIME
    assert result.exit_code == -124
    assert result.stdout == "partial"
    assert result.stderr == "err\nExecution timeout after 2.5s\n"
    assert result.detail == "time_limit_exceeded"


def test_timeout_wins_over_oom_and_cap_and_report() -> None:
    result = classify(
        outcome(timed_out=True, oom_killed=True, output_capped=True, report=report(), signal=9), wall_time_s=1
    )
    assert result.resource_limit_type is ResourceLimitType.TIME
    assert result.exit_code == -124


def test_oom_kill() -> None:
    result = classify(outcome(stderr=b"partial err\n", oom_killed=True, signal=9), wall_time_s=10)
    assert result.status is Status.RESOURCE_LIMIT_EXCEEDED
    assert result.resource_limit_type is ResourceLimitType.MEMORY
    assert result.exit_code == -137
    assert result.stderr == "partial err\nMemory limit exceeded (killed by OOM)\n"
    assert result.detail == "memory_limit_exceeded"


def test_oom_kill_of_a_child_wins_over_a_successful_report() -> None:
    result = classify(outcome(oom_killed=True, report=report(value=1)), wall_time_s=10)
    assert result.resource_limit_type is ResourceLimitType.MEMORY
    assert result.exit_code == -137


def test_output_cap() -> None:
    result = classify(outcome(stdout=b"x" * 10, output_capped=True), wall_time_s=10)
    assert result.status is Status.RESOURCE_LIMIT_EXCEEDED
    assert result.resource_limit_type is ResourceLimitType.OUTPUT
    assert result.stdout == "x" * 10
    assert result.stderr.endswith("Output limit exceeded\n")
    assert result.exit_code != 0


def test_oom_wins_over_output_cap() -> None:
    result = classify(outcome(output_capped=True, oom_killed=True), wall_time_s=10)
    assert result.resource_limit_type is ResourceLimitType.MEMORY


def test_program_error_from_the_report() -> None:
    result = classify(outcome(stderr=b"Traceback...\n", report=report(exit_code=1)), wall_time_s=10, artifacts=(ARTIFACT,))
    assert result.status is Status.PROGRAM_ERROR
    assert result.exit_code == 1
    assert result.stderr == "Traceback...\n"
    assert result.detail == "program_error"
    assert result.artifacts == (ARTIFACT,)  # files saved before the failure are kept
    assert result.result is None


def test_sys_exit_code_is_kept() -> None:
    result = classify(outcome(report=report(exit_code=3)), wall_time_s=10)
    assert result.status is Status.PROGRAM_ERROR
    assert result.exit_code == 3


def test_memory_error_in_the_program() -> None:
    result = classify(outcome(stderr=b"MemoryError\n", report=report(exit_code=1, kind="memory")), wall_time_s=10)
    assert result.status is Status.RESOURCE_LIMIT_EXCEEDED
    assert result.resource_limit_type is ResourceLimitType.MEMORY
    assert result.exit_code == 1  # the program's own exit code, per docs/api.md
    assert result.stderr == "MemoryError\n"
    assert result.detail == "memory_error"


@pytest.mark.parametrize(
    ("kind", "access"), [("network", UnauthorizedAccessType.NETWORK_ACCESS), ("file", UnauthorizedAccessType.FILE_ACCESS)]
)
def test_access_errors_in_the_program(kind: str, access: UnauthorizedAccessType) -> None:
    result = classify(outcome(report=report(exit_code=1, kind=kind)), wall_time_s=10)
    assert result.status is Status.UNAUTHORIZED_ACCESS
    assert result.unauthorized_access_type is access
    assert result.exit_code == 1
    assert result.detail == access.value


def test_seccomp_kill_is_a_disallowed_syscall() -> None:
    result = classify(outcome(stdout=b"before\n", signal=signal.SIGSYS), wall_time_s=10)
    assert result.status is Status.UNAUTHORIZED_ACCESS
    assert result.unauthorized_access_type is UnauthorizedAccessType.DISALLOWED_SYSCALL
    assert result.exit_code == -31
    assert result.stdout == "before\n"
    assert "Disallowed system call" in result.stderr


@pytest.mark.parametrize(("signum", "name"), [(signal.SIGKILL, "SIGKILL"), (signal.SIGSEGV, "SIGSEGV"), (signal.SIGABRT, "SIGABRT")])
def test_death_by_signal(signum: int, name: str) -> None:
    result = classify(outcome(signal=signum), wall_time_s=10)
    assert result.status is Status.RUNTIME_ERROR
    assert result.runtime_error_type is RuntimeErrorType.SIGNALLED
    assert result.exit_code == -signum
    assert result.detail == f"signalled:{name}"
    assert name in result.stderr


def test_death_by_an_unnamed_signal() -> None:
    result = classify(outcome(signal=40), wall_time_s=10)
    assert result.status is Status.RUNTIME_ERROR
    assert result.exit_code == -40
    assert result.detail == "signalled:40"


def test_nonzero_exit_without_a_report() -> None:
    result = classify(outcome(stderr=b"Fatal\n", exit_code=2), wall_time_s=10)
    assert result.status is Status.RUNTIME_ERROR
    assert result.runtime_error_type is RuntimeErrorType.NONZERO_EXIT
    assert result.exit_code == 2
    assert result.stderr == "Fatal\n"


def test_clean_exit_without_a_report_is_success_without_a_result() -> None:
    # e.g. os._exit(0) in main: the process ended well but main returned nothing
    result = classify(outcome(exit_code=0), wall_time_s=10)
    assert result.status is Status.SUCCESS
    assert result.result is None


def test_no_report_no_status_is_not_success() -> None:
    # a sandbox whose process status is unknown (e.g. killed from outside, status < 0) must not pass as success
    result = classify(outcome(exit_code=None, signal=None), wall_time_s=10)
    assert result.status is Status.RUNTIME_ERROR
    assert result.exit_code != 0
    assert result.result is None


def test_invalid_utf8_output_is_replaced_not_fatal() -> None:
    result = classify(outcome(stdout=b"ok \xff\xfe", report=report()), wall_time_s=10)
    assert result.stdout == "ok \ufffd\ufffd"


def test_missing_usage_figures_stay_none() -> None:
    result = classify(outcome(report=report(), memory_peak_bytes=None, cpu_time_ms=None), wall_time_s=10)
    assert result.memory_used_kb is None
    assert result.cpu_time_ms is None


@pytest.mark.parametrize(
    ("code", "detail", "stderr"),
    [
        (EXIT_UNSAFE, "Code is unsafe", "Line 1: Import of 'os' is not allowed\n"),
        (EXIT_BUSY, "no_available_container", "Container pool is busy\n"),
        (EXIT_RATE_LIMITED, "rate_limited", "Too many requests, please try again later\n"),
        (EXIT_INTERNAL, "internal_error", "boom\n"),
    ],
)
def test_runner_errors(code: int, detail: str, stderr: str) -> None:
    result = runner_error(code, detail, stderr)
    assert result.status is Status.PROGRAM_RUNNER_ERROR
    assert result.exit_code == code
    assert result.detail == detail
    assert result.stderr == stderr
    assert result.stdout == ""
