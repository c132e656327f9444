"""Static checks over every Python file of the repository: no undefined or unused names, no syntax
errors (pyflakes' rules and E9, through ruff), so a typo in a rarely taken error branch fails here."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_no_undefined_or_unused_names():
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--select", "F,E9",
                           "--exclude", ".venv,runs", "--output-format", "concise", str(ROOT)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
