"""The shell scripts users submit or run: syntax-checked, and pointing at real ktrain options."""

import subprocess

import pytest

from helpers import REPO

SCRIPTS = sorted((REPO / "scripts").rglob("*.sh")) + sorted((REPO / "scripts").rglob("*.sbatch"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
