"""The documentation: the pages build as a site with no broken link or missing page, and the
getting-started page's code and config train as written."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO, run_cli

pytestmark = pytest.mark.fast  # the fast tier: README, Development

DOCS = REPO / "docs"


def test_the_pages_build_strictly(tmp_path):
    """mkdocs.yml sets strict: a link to a missing page or anchor, or a page left out of the
    nav, fails the build."""
    mkdocs = Path(sys.executable).parent / "mkdocs"
    if not mkdocs.exists():
        pytest.skip("mkdocs is not installed: bash scripts/setup.sh installs it (test extra)")
    result = subprocess.run([mkdocs, "build", "--strict", "--site-dir", tmp_path / "site"],
                            cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={"NO_MKDOCS_2_WARNING": "1", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "site" / "getting-started" / "index.html").exists()


def test_the_config_reference_is_the_schemas():
    """docs/config-reference.md is generated from ktrain's config schema: it cannot drift, and
    every key has a docstring to show there."""
    sys.path.insert(0, str(REPO / "scripts"))
    import config_reference

    assert not config_reference.undocumented(), "give these keys a docstring in ktrain.config"
    assert config_reference.PAGE.read_text() == config_reference.reference(), (
        "docs/config-reference.md is stale: run python scripts/config_reference.py")


def blocks(page: Path, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", page.read_text(), re.S | re.M)


def test_the_getting_started_blocks_train_as_written(tmp_path):
    page = DOCS / "getting-started.md"
    (tmp_path / "models.py").write_text("\n\n".join(blocks(page, "python")))
    [config] = blocks(page, "yaml")
    (tmp_path / "first.yaml").write_text(config)
    result = run_cli("run", "first.yaml", "-q", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((tmp_path / "runs" / "first" / "summary.json").read_text())
    assert summary["num_replicas"] == 2 and summary["epochs_completed"] == 3
    assert summary["final_metrics"]["val_accuracy"] > 0.8
