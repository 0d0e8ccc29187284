"""The package's import layers and forbidden imports (pyproject.toml, [tool.importlinter]) hold."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_lint_imports_keeps_every_contract():
    pytest.importorskip("importlinter")
    beside = Path(sys.executable).parent  # the environment's own, before any on PATH
    command = shutil.which("lint-imports", path=str(beside)) or shutil.which("lint-imports")
    assert command, "lint-imports is not installed (the test extra's import-linter)"
    # from the repository root: it reads pyproject.toml there and analyses that checkout's stal_ray
    result = subprocess.run([command, "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
