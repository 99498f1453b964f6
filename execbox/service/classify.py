"""Turn the raw facts of a run (RunOutcome) into the typed verdict of docs/api.md.

The host decides: time, memory, the output cap, a violated report channel and how the
process ended are what the host observed; the driver's report (already checked by the
supervisor) only adds the return value, the error kind of an uncaught exception and the
time it measured. The reserved exit codes (``execbox.wire``) come only from here and
from the executor, never from a report (whose exit code is 0..255).
"""

from __future__ import annotations

import signal

from execbox.isolation.base import RunOutcome
from execbox.models import (
    Artifact,
    ExecutionResult,
    ResourceLimitType,
    ResultValue,
    RuntimeErrorType,
    SkippedArtifact,
    Status,
    UnauthorizedAccessType,
)
from execbox.wire import (
    EXIT_BUSY,
    EXIT_INTERNAL,
    EXIT_OOM,
    EXIT_OUTPUT,
    EXIT_RATE_LIMITED,
    EXIT_TIMEOUT,
    EXIT_UNSAFE,
    ResultRefused,
    checked_result_value,
)

__all__ = [
    "EXIT_BUSY",
    "EXIT_INTERNAL",
    "EXIT_OOM",
    "EXIT_OUTPUT",
    "EXIT_RATE_LIMITED",
    "EXIT_TIMEOUT",
    "EXIT_UNSAFE",
    "classify",
    "runner_error",
]

_KIND_TO_ACCESS = {"network": UnauthorizedAccessType.NETWORK_ACCESS, "file": UnauthorizedAccessType.FILE_ACCESS}


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def _append(stderr: str, line: str) -> str:
    return f"{stderr}{'' if not stderr or stderr.endswith(chr(10)) else chr(10)}{line}\n"


def runner_error(exit_code: int, detail: str, stderr: str) -> ExecutionResult:
    """A verdict for a request that never ran: unsafe code, busy pool, rate limit, fault."""
    return ExecutionResult(status=Status.PROGRAM_RUNNER_ERROR, exit_code=exit_code, detail=detail, stderr=stderr)


def _time_ms(outcome: RunOutcome) -> float:
    """The driver's measure of the program's time when it is plausible (within the host's
    wall time of the run), else the host's."""
    report = outcome.report
    if report is not None and report.time_ms is not None and 0 <= report.time_ms <= outcome.wall_time_ms:
        return report.time_ms
    return outcome.wall_time_ms


def classify(
    outcome: RunOutcome,
    *,
    wall_time_s: float,
    artifacts: tuple[Artifact, ...] = (),
    backend: str | None = None,
    artifacts_skipped: tuple[SkippedArtifact, ...] = (),
) -> ExecutionResult:
    """The verdict, in order of precedence: time, memory, output cap, a violated report
    channel, the driver's report, then how the process ended (signal, exit status)."""
    stdout, stderr = _text(outcome.stdout), _text(outcome.stderr)
    report = outcome.report
    common = {
        "stdout": stdout,
        "time_used_ms": round(_time_ms(outcome), 3),
        "memory_used_kb": outcome.memory_peak_bytes / 1024 if outcome.memory_peak_bytes is not None else None,
        "cpu_time_ms": round(outcome.cpu_time_ms, 3) if outcome.cpu_time_ms is not None else None,
        "backend": backend,
    }
    limit = Status.RESOURCE_LIMIT_EXCEEDED
    if outcome.timed_out:
        return ExecutionResult(
            status=limit, resource_limit_type=ResourceLimitType.TIME, exit_code=EXIT_TIMEOUT,
            detail="time_limit_exceeded", stderr=_append(stderr, f"Execution timeout after {wall_time_s:g}s"), **common,
        )
    if outcome.oom_killed:
        return ExecutionResult(
            status=limit, resource_limit_type=ResourceLimitType.MEMORY, exit_code=EXIT_OOM,
            detail="memory_limit_exceeded", stderr=_append(stderr, "Memory limit exceeded (killed by OOM)"), **common,
        )
    if outcome.output_capped:
        return ExecutionResult(
            status=limit, resource_limit_type=ResourceLimitType.OUTPUT, exit_code=EXIT_OUTPUT,
            detail="output_limit_exceeded", stderr=_append(stderr, "Output limit exceeded"), **common,
        )
    if outcome.report_violation is not None:
        return ExecutionResult(
            status=Status.PROGRAM_ERROR, exit_code=1, detail="report_channel_violation",
            stderr=_append(stderr, "execbox: the program wrote to the driver's report channel; it was stopped"),
            **common,
        )
    files = {"artifacts": artifacts, "artifacts_skipped": artifacts_skipped}
    if report is not None:
        if report.exit_code == 0:
            result = None
            if report.result:
                try:
                    result = ResultValue(
                        present=report.result.get("present", True),
                        value=checked_result_value(report.result.get("value")),
                        type=report.result.get("type", "json"),
                    )
                except ResultRefused as exc:
                    return ExecutionResult(
                        status=Status.PROGRAM_ERROR, exit_code=1, detail="invalid_result",
                        stderr=_append(stderr, f"ValueError: main() returned a value execbox cannot carry: {exc}"),
                        **files, **common,
                    )
            return ExecutionResult(status=Status.SUCCESS, stderr=stderr, result=result, **files, **common)
        if report.error_kind == "result":
            return ExecutionResult(
                status=Status.PROGRAM_ERROR, exit_code=report.exit_code or 1, detail="invalid_result",
                stderr=stderr, **files, **common,
            )
        if report.error_kind == "time":  # a session cell the driver interrupted at its time limit
            return ExecutionResult(
                status=limit, resource_limit_type=ResourceLimitType.TIME, exit_code=EXIT_TIMEOUT,
                detail="time_limit_exceeded", stderr=stderr, **files, **common,
            )
        if report.error_kind == "memory":
            return ExecutionResult(
                status=limit, resource_limit_type=ResourceLimitType.MEMORY, exit_code=report.exit_code,
                detail="memory_error", stderr=stderr, **files, **common,
            )
        access = _KIND_TO_ACCESS.get(report.error_kind or "")
        if access is not None:
            return ExecutionResult(
                status=Status.UNAUTHORIZED_ACCESS, unauthorized_access_type=access, exit_code=report.exit_code,
                detail=access.value, stderr=stderr, **files, **common,
            )
        return ExecutionResult(
            status=Status.PROGRAM_ERROR, exit_code=report.exit_code, detail="program_error",
            stderr=stderr, **files, **common,
        )
    if outcome.signal is not None:
        if outcome.signal == signal.SIGSYS:
            return ExecutionResult(
                status=Status.UNAUTHORIZED_ACCESS, unauthorized_access_type=UnauthorizedAccessType.DISALLOWED_SYSCALL,
                exit_code=-outcome.signal, detail="disallowed_syscall",
                stderr=_append(stderr, "Disallowed system call (killed by seccomp)"), **common,
            )
        name = signal.Signals(outcome.signal).name if outcome.signal in signal.Signals._value2member_map_ else str(outcome.signal)
        return ExecutionResult(
            status=Status.RUNTIME_ERROR, runtime_error_type=RuntimeErrorType.SIGNALLED, exit_code=-outcome.signal,
            detail=f"signalled:{name}", stderr=_append(stderr, f"Program killed by signal {name}"), **common,
        )
    if outcome.exit_code is None:  # ended without a report and without a known status
        return ExecutionResult(
            status=Status.RUNTIME_ERROR, runtime_error_type=RuntimeErrorType.SIGNALLED, exit_code=-1,
            detail="unknown_exit", stderr=_append(stderr, "Program ended without an exit status"), **common,
        )
    exit_code = outcome.exit_code
    if exit_code == 0:
        return ExecutionResult(status=Status.SUCCESS, stderr=stderr, **common)
    return ExecutionResult(
        status=Status.RUNTIME_ERROR, runtime_error_type=RuntimeErrorType.NONZERO_EXIT, exit_code=exit_code,
        detail="nonzero_exit", stderr=stderr, **common,
    )
