"""The wire contract (execbox.wire): serialisation never fails on what a program returns."""

from __future__ import annotations

import json

import pytest

from execbox.models import Artifact, ExecutionResult, ResultValue, SkippedArtifact, Status
from execbox.wire import (
    EXIT_BUSY,
    EXIT_INTERNAL,
    EXIT_OOM,
    EXIT_RATE_LIMITED,
    EXIT_TIMEOUT,
    EXIT_UNSAFE,
    MAX_RESULT_DEPTH,
    RESERVED_EXIT_CODES,
    RUN_FIELDS,
    ResultRefused,
    checked_result_value,
    dumps,
    result_from_json,
    result_to_json,
)


def nested(depth: int) -> list[object]:
    value: list[object] = []
    for _ in range(depth - 1):
        value = [value]
    return value


def test_exit_codes_are_the_api_ones() -> None:
    assert (EXIT_TIMEOUT, EXIT_OOM, EXIT_UNSAFE, EXIT_BUSY, EXIT_RATE_LIMITED, EXIT_INTERNAL) == (
        -124, -137, -999, -10, -429, -3,
    )
    assert {-124, -137, -999, -10, -429, -3} <= RESERVED_EXIT_CODES


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("\ud800", "\ufffd"),
        ({"k\udfff": ["a\ud83d"]}, {"k\ufffd": ["a\ufffd"]}),
        ("\U0001f600", "\U0001f600"),  # a proper pair stays
        ([float("nan"), float("inf"), -float("inf"), 0.5], [None, None, None, 0.5]),
        (nested(MAX_RESULT_DEPTH), nested(MAX_RESULT_DEPTH)),
    ],
)
def test_result_values_are_made_encodable(value: object, expected: object) -> None:
    safe = checked_result_value(value)
    assert safe == expected
    json.dumps(safe, allow_nan=False).encode("utf-8")


@pytest.mark.parametrize("depth", [MAX_RESULT_DEPTH + 1, 800, 5000])
def test_too_deep_is_refused_with_a_reason(depth: int) -> None:
    with pytest.raises(ResultRefused, match="deeper than"):
        checked_result_value(nested(depth))


def test_dumps_never_fails() -> None:
    text = dumps({"a": "\ud800", "b": float("nan"), "c": nested(200)})
    data = json.loads(text)
    assert data["a"] == "\ufffd"
    assert data["b"] is None


def test_run_answer_has_exactly_ragflows_fields_and_native_adds_three() -> None:
    result = ExecutionResult(
        status=Status.SUCCESS, stdout="o\ud800", result=ResultValue(present=True, value="\udc00"),
        artifacts=(Artifact(name="a.png", mime_type="image/png", size=1, content=b"x"),),
        artifacts_skipped=(SkippedArtifact(name="b.txt", reason="type .txt is not allowed"),),
        cpu_time_ms=1.0, backend="namespaces",
    )
    run = result_to_json(result)
    assert tuple(run) == RUN_FIELDS
    native = result_to_json(result, native=True)
    assert set(native) - set(run) == {"cpu_time_ms", "backend", "artifacts_skipped"}
    assert native["artifacts_skipped"] == [{"name": "b.txt", "reason": "type .txt is not allowed"}]
    assert json.loads(dumps(native))["stdout"] == "o\ufffd"
    back = result_from_json(json.loads(dumps(native)))
    assert back.artifacts[0].content == b"x"
    assert back.artifacts_skipped == result.artifacts_skipped
    assert back.result == ResultValue(present=True, value="\ufffd")
    assert back.backend == "namespaces"
