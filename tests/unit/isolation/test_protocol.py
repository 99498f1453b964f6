"""Host <-> driver framing: 4-byte big-endian length + UTF-8 JSON, in both directions.

Besides the host-side functions, the real Python and Node drivers are run *unsandboxed*
on a trusted test program, to check that both ends speak the same protocol.
"""

from __future__ import annotations

import base64
import json
import os
import selectors
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from execbox.errors import SandboxProtocolError
from execbox.isolation.base import DriverReport
from execbox.isolation.protocol import FrameReader, encode_request, parse_report
from execbox.models import ExecutionRequest, Language
from execbox.runtimes import CONTROL_FD_ENV, EVENTS_FD_ENV, RUNTIMES


def frame(message: Any) -> bytes:
    body = json.dumps(message).encode()
    return len(body).to_bytes(4, "big") + body


def test_request_frame_layout() -> None:
    request = ExecutionRequest(
        code="def main(x):\n    return x\n",
        arguments={"x": [1, "ü"]},
        stdin="in",
        files={"data/in.bin": b"\x00\xff"},
        env={"K": "V"},
    )
    data = encode_request(request)
    size = int.from_bytes(data[:4], "big")
    assert size == len(data) - 4
    body = json.loads(data[4:].decode("utf-8"))
    assert body == {
        "code": request.code,
        "arguments": {"x": [1, "ü"]},
        "stdin": "in",
        "files": {"data/in.bin": base64.b64encode(b"\x00\xff").decode()},
        "env": {"K": "V"},
    }


def test_reader_parses_frames_split_anywhere() -> None:
    messages = [{"event": "ready"}, {"event": "done", "exit_code": 0, "text": "é" * 50}]
    data = b"".join(frame(m) for m in messages)
    reader = FrameReader()
    got: list[dict[str, Any]] = []
    for i in range(len(data)):
        got += reader.feed(data[i : i + 1])
    assert got == messages


def test_reader_parses_several_frames_in_one_chunk_and_keeps_the_rest() -> None:
    reader = FrameReader()
    first, second = frame({"a": 1}), frame({"b": 2})
    assert reader.feed(first + second + second[:3]) == [{"a": 1}, {"b": 2}]
    assert reader.feed(second[3:]) == [{"b": 2}]
    assert reader.feed(b"") == []


def test_reader_refuses_an_oversized_frame() -> None:
    with pytest.raises(SandboxProtocolError, match="bytes"):
        FrameReader().feed((1 << 31).to_bytes(4, "big") + b"{}")


def test_reader_refuses_a_frame_that_is_not_json() -> None:
    with pytest.raises(SandboxProtocolError, match="not JSON"):
        FrameReader().feed((3).to_bytes(4, "big") + b"{x}")


@pytest.mark.parametrize("body", [b"[1, 2]", b'"text"', b"42", b"null"])
def test_reader_refuses_a_frame_that_is_not_an_object(body: bytes) -> None:
    with pytest.raises(SandboxProtocolError, match="object"):
        FrameReader().feed(len(body).to_bytes(4, "big") + body)


def test_parse_report_of_a_success() -> None:
    report = parse_report({"event": "done", "exit_code": 0, "result": {"present": True, "value": [1]}, "time_ms": 3})
    assert report == DriverReport(exit_code=0, result={"present": True, "value": [1]}, error_kind=None, time_ms=3.0)


def test_parse_report_of_a_failure() -> None:
    report = parse_report({"event": "done", "exit_code": 1, "result": None, "error_kind": "network", "time_ms": None})
    assert report == DriverReport(exit_code=1, result=None, error_kind="network", time_ms=None)


@pytest.mark.parametrize(
    "message",
    [
        {"event": "done"},  # no exit code
        {"event": "done", "exit_code": "one"},
        {"event": "done", "exit_code": 0, "result": [1]},
        {"event": "done", "exit_code": 0, "result": {"present": True}},  # no value
        {"event": "done", "exit_code": 1, "error_kind": "kernel"},
        {"event": "done", "exit_code": 0, "time_ms": "fast"},
    ],
)
def test_parse_report_refuses_malformed_reports(message: dict[str, Any]) -> None:
    with pytest.raises(SandboxProtocolError, match="malformed"):
        parse_report(message)


# -- both ends together: the real drivers, unsandboxed, on a trusted program --------------


def _drive(argv: list[str], cwd: Path, request: ExecutionRequest, env: dict[str, str]) -> tuple[list[dict[str, Any]], bytes, bytes]:
    control_r, control_w = os.pipe()
    events_r, events_w = os.pipe()
    process = subprocess.Popen(
        argv,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        pass_fds=(control_r, events_w),
        env={**env, CONTROL_FD_ENV: str(control_r), EVENTS_FD_ENV: str(events_w)},
    )
    os.close(control_r)
    os.close(events_w)
    reader, events = FrameReader(), []
    try:
        deadline = time.monotonic() + 60
        with selectors.DefaultSelector() as sel:
            sel.register(events_r, selectors.EVENT_READ)
            while not any(e.get("event") == "done" for e in events):
                assert time.monotonic() < deadline, f"driver silent; events so far {events}"
                if not sel.select(1):
                    continue
                data = os.read(events_r, 65536)
                assert data, f"driver closed its events channel early: {process.stderr.read() if process.stderr else b''!r}"
                events += reader.feed(data)
                if events and events[-1].get("event") == "ready" and len(events) == 1:
                    os.write(control_w, encode_request(request))
    finally:
        os.close(control_w)  # EOF on control: the driver exits
        os.close(events_r)
    stdout, stderr = process.communicate(timeout=60)
    return events, stdout, stderr


def test_python_driver_speaks_the_protocol(tmp_path: Path) -> None:
    driver = RUNTIMES[Language.PYTHON].driver_path
    request = ExecutionRequest(
        code="import sys\ndef main(a, b):\n    print('out', a)\n    print('err', file=sys.stderr)\n    return {'sum': a + b}\n",
        arguments={"a": 40, "b": 2},
        files={"in.txt": b"data"},
    )
    events, stdout, stderr = _drive([sys.executable, "-I", "-B", str(driver)], tmp_path, request, {"PATH": "/usr/bin:/bin"})
    assert [e["event"] for e in events] == ["ready", "done"]
    report = parse_report(events[1])
    assert report.exit_code == 0
    assert report.result == {"present": True, "value": {"sum": 42}}
    assert report.time_ms is not None and report.time_ms >= 0
    assert stdout == b"out 40\n"
    assert stderr == b"err\n"
    assert (tmp_path / "in.txt").read_bytes() == b"data"
    assert (tmp_path / "artifacts").is_dir()


def test_python_driver_reports_a_failure(tmp_path: Path) -> None:
    driver = RUNTIMES[Language.PYTHON].driver_path
    request = ExecutionRequest(code="def main():\n    raise KeyError('k')\n")
    events, _, stderr = _drive([sys.executable, "-I", "-B", str(driver)], tmp_path, request, {})
    report = parse_report(events[-1])
    assert report.exit_code == 1
    assert report.result is None
    assert b"KeyError: 'k'" in stderr
    assert b'File "main.py", line 2, in main' in stderr


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_nodejs_driver_speaks_the_protocol(tmp_path: Path) -> None:
    driver = RUNTIMES[Language.NODEJS].driver_path
    request = ExecutionRequest(
        language=Language.NODEJS,
        code="async function main(args) { console.log('out', args.a); console.error('err'); return args.a * 2; }",
        arguments={"a": 21},
    )
    events, stdout, stderr = _drive([shutil.which("node") or "node", str(driver)], tmp_path, request, {})
    assert [e["event"] for e in events] == ["ready", "done"]
    report = parse_report(events[1])
    assert report.exit_code == 0
    assert report.result == {"present": True, "value": 42}
    assert stdout == b"out 21\n"
    assert stderr == b"err\n"
