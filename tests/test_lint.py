"""The linter runs inside the test suite: `pytest` alone is the whole check (README: The tests)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINTED = ("qwen3vl_lab", "tests", "notebooks")  # the configuration is pyproject.toml's [tool.ruff]


def test_ruff_is_clean():
    done = subprocess.run([sys.executable, "-m", "ruff", "check", *LINTED], cwd=ROOT, capture_output=True, text=True,
                          check=False)
    assert "No module named ruff" not in done.stderr, "ruff is missing: pip install -e \".[dev]\""
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
