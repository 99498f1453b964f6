"""The driver's report is untrusted input (issue 9, finding 3): the host checks its shape
strictly, believes only a report with the run's token from a driver still alive, and
turns garbage on the channel into a verdict about the program, never internal_error."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

from execbox.errors import SandboxProtocolError
from execbox.isolation.base import RunOutcome
from execbox.isolation.protocol import FrameReader, parse_report
from execbox.isolation.supervise import supervise
from execbox.models import Status
from execbox.service.classify import classify

TOKEN = "t0ken"


def frame(message: Any) -> bytes:
    body = json.dumps(message).encode()
    return len(body).to_bytes(4, "big") + body


def done(**fields: Any) -> dict[str, Any]:
    return {"event": "done", "exit_code": 0, "result": {"present": True, "value": 1}, "error_kind": None,
            "time_ms": 1.0, **fields}


@pytest.mark.parametrize(
    "message",
    [
        done(exit_code=-10), done(exit_code=-999), done(exit_code=-3), done(exit_code=-124), done(exit_code=1 << 70),
        done(exit_code=256), done(exit_code=True), done(exit_code=1.0), done(time_ms=-5), done(time_ms=1e300),
        done(time_ms=True), done(exit_code=1, result={"present": True, "value": 1}), done(error_kind="memory"),
        done(result={"present": "yes", "value": 1}), {"event": "ready", "exit_code": 0},
    ],
)
def test_reports_outside_the_contract_are_refused(message: dict[str, Any]) -> None:
    with pytest.raises(SandboxProtocolError, match="malformed"):
        parse_report(message)


def run_supervisor(events: bytes, *, close_events: bool) -> Any:
    """supervise() against pipes pre-filled with what a 'driver' wrote."""
    control_r, control_w = os.pipe()
    events_r, events_w = os.pipe()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    killed: list[bool] = []
    try:
        os.write(events_w, events)
        os.close(out_w)
        os.close(err_w)
        if close_events:
            os.close(events_w)
        seen = supervise(
            control_fd=control_w, events_fd=events_r, stdout_fd=out_r, stderr_fd=err_r, payload=b"x",
            wall_time_s=2.0, output_bytes=1 << 20, kill=lambda: killed.append(True), reader=FrameReader(), token=TOKEN,
        )
    finally:
        for fd in (control_r, control_w, events_r, out_r, err_r) + (() if close_events else (events_w,)):
            os.close(fd)
    return seen, killed


def test_only_the_report_with_the_token_is_believed() -> None:
    forged = frame(done(result={"present": True, "value": "forged"}))
    real = frame(done(token=TOKEN, exit_code=3, result=None))
    seen, _ = run_supervisor(forged + real, close_events=False)
    assert seen.report is not None and seen.report.exit_code == 3
    assert seen.violation is None


def test_a_forged_report_and_an_exit_leave_the_verdict_to_the_exit_status() -> None:
    seen, _ = run_supervisor(frame(done(result={"present": True, "value": "forged"})), close_events=True)
    assert seen.report is None


def test_a_report_from_a_process_that_then_ended_is_not_believed() -> None:
    seen, _ = run_supervisor(frame(done(token=TOKEN)), close_events=True)
    assert seen.report is None  # a real driver blocks after its report; this one is gone


@pytest.mark.parametrize("garbage", [(5).to_bytes(4, "big") + b"{{{{{", (1 << 31).to_bytes(4, "big") + b"{}",
                                     frame(done(token=TOKEN, exit_code=-10))])
def test_garbage_is_a_verdict_about_the_program(garbage: bytes) -> None:
    seen, killed = run_supervisor(garbage, close_events=False)
    assert seen.violation and killed
    outcome = RunOutcome(stdout=b"", stderr=b"", report=None, exit_code=None, signal=None,
                         report_violation=seen.violation, wall_time_ms=1.0)
    result = classify(outcome, wall_time_s=1.0)
    assert result.status is Status.PROGRAM_ERROR
    assert result.detail == "report_channel_violation"
    assert result.exit_code == 1
