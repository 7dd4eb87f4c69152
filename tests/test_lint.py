"""The code passes the linter configured in pyproject.toml (ruff: pyflakes, pycodestyle, import order, bugbear)."""
import subprocess
import sys

from test_train import ROOT


def test_ruff_finds_nothing():
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", ROOT], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
