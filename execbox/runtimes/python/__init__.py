"""The Python runtime: the system's CPython with a venv of packages, and its driver."""

from __future__ import annotations

from pathlib import Path

from execbox.models import Language
from execbox.runtimes.base import Runtime

__all__ = ["PYTHON"]

_HERE = Path(__file__).resolve().parent

PYTHON = Runtime(
    language=Language.PYTHON,
    driver_path=_HERE / "driver.py",
    packages_file=_HERE / "requirements.txt",
    driver_in_process=True,
    argv_template=("{runtime}/bin/python3", "-I", "-B", "{driver}"),
    env=(
        ("MPLBACKEND", "Agg"),
        ("MPLCONFIGDIR", "/tmp/matplotlib"),
        ("PYTHONHASHSEED", "random"),
    ),
)
