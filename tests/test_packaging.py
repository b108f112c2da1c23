"""`pip install .` (not only the editable install the tests run from) makes `--executor sticky` work."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_regular_install_is_discovered_by_the_snakemake_cli(tmp_path: Path):
    site = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(site),
            str(ROOT),
        ],
        check=True,
    )
    env = dict(os.environ, PYTHONPATH=str(site))
    found = subprocess.run(
        [sys.executable, "-c", "import snakemake_executor_plugin_sticky as m; print(m.__file__)"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    ).stdout
    assert found.startswith(str(site)), found
    help_text = subprocess.run(
        [sys.executable, "-m", "snakemake", "--help"], env=env, capture_output=True, text=True, cwd=tmp_path
    ).stdout
    assert "--sticky-workers" in help_text
