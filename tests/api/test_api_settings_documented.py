"""Every setting is documented with its exact default in README.md and .env.example.

Both are generated from ``Settings.model_fields`` by ``docs/gen_settings.py``; this
fails when a setting was added or changed without regenerating them.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_readme_and_env_example_match_the_settings() -> None:
    check = subprocess.run(
        [sys.executable, str(ROOT / "docs" / "gen_settings.py"), "--check"],
        cwd=ROOT, capture_output=True, text=True, check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_every_setting_is_named_in_both() -> None:
    from execbox.settings import Settings

    readme = (ROOT / "README.md").read_text()
    example = (ROOT / ".env.example").read_text()
    for field in Settings.model_fields:
        name = "SANDBOX_" + field.upper()
        assert f"`{name}`" in readme, f"{name} is missing from README.md"
        assert f"# {name}=" in example, f"{name} is missing from .env.example"
