"""The Python runtime: the system's CPython with a venv of packages, and its driver."""

from __future__ import annotations

from pathlib import Path

from execbox.models import Language
from execbox.runtimes.base import RUNTIME_MOUNT, SYSTEM_PYTHON, Runtime
from execbox.runtimes.python.packages import PYPI

__all__ = ["PYTHON"]

_HERE = Path(__file__).resolve().parent

PYTHON = Runtime(
    language=Language.PYTHON,
    display_name="Python",
    file_suffixes=(".py",),
    interpreter=Path(SYSTEM_PYTHON),
    builder="venv",
    version_file="pyvenv.cfg",
    inspector="python",
    packages=PYPI,
    preload=True,
    driver_path=_HERE / "driver.py",
    packages_file=_HERE / "requirements.txt",
    driver_in_process=True,
    argv_template=("{runtime}/bin/python3", "-I", "-B", "{driver}"),
    env=(
        ("MPLBACKEND", "Agg"),
        ("MPLCONFIGDIR", "/tmp/matplotlib"),
        ("PYTHONHASHSEED", "random"),
        # the font cache `execbox build` prepared; the driver copies it into MPLCONFIGDIR
        ("EXECBOX_MPL_CACHE", f"{RUNTIME_MOUNT}/mplconfig"),
    ),
)
