"""No Docker engine runs here, so the images are linted, and checked to install like the README."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO

DOCKERFILES = sorted((REPO / "docker").glob("Dockerfile.*"))
HADOLINT = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint_and_uses_the_setup_script(dockerfile):
    result = subprocess.run([HADOLINT, str(dockerfile)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "bash scripts/setup.sh" in dockerfile.read_text()


def test_there_is_a_cpu_and_a_gpu_image():
    assert {p.name for p in DOCKERFILES} == {"Dockerfile.cpu", "Dockerfile.gpu"}
