"""Lint and format are part of the suite: ruff's rules with the 100-column line length, and
`ruff format`, on every package, the tests and the benchmarks."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PATHS = ["compiler", "runtime", "targets", "tests", "bench"]


def ruff() -> str:
    found = Path(sys.executable).with_name("ruff")
    if found.exists():
        return str(found)
    on_path = shutil.which("ruff")
    if not on_path:
        pytest.fail("ruff is not installed (pip install -e '.[dev]')")
    return on_path


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]])
def test_ruff(command):
    done = subprocess.run(
        [ruff(), *command, *PATHS],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-1000:]
