"""Snakemake's own test workflows with Python `script:` rules, each such rule made sticky as a user
would make it (`--set-resources RULE:sticky=NAME`), give what the local executor gives and what
their expected results say.

The workflows come from Snakemake's source distribution of the installed version, fetched from
the package registry once and kept beside the environment. Those that need conda, containers, a
cloud, R, Rust or Julia, or polars, or that test a feature sticky rules refuse (`benchmark:`), are left out:
`CHOSEN` names the rest.
"""

from __future__ import annotations

import filecmp
import json
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from snakemake import __version__ as SNAKEMAKE_VERSION

from conftest import Workflow

CHOSEN = (
    "test_github_issue_14",
    "test_handover",
    "test_issue916",
    "test_paramspace",
    "test_paramspace_single_wildcard",
    "test_script_import_snakemake_obj",
    "test_script_py",
)
# the arguments Snakemake's own tests run them with (tests/tests.py)
ARGUMENTS = {"test_github_issue_14": ("--skip-script-cleanup",), "test_handover": ("--resources", "mem_mb=20")}
CACHE = Path(sys.prefix) / "share" / "snakemake-tests" / SNAKEMAKE_VERSION
NO_STATE = "def setup():\n    return None\n"
SKIP = {".snakemake", "expected-results", "sticky-conformance.yaml", "sticky_none.py"}


def snakemake_tests() -> Path:
    """The `tests/` folder of Snakemake's source distribution of the installed version."""
    tests = CACHE / f"snakemake-{SNAKEMAKE_VERSION}" / "tests"
    if tests.is_dir():
        return tests
    CACHE.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(CACHE)]
    subprocess.run([*pip, f"snakemake=={SNAKEMAKE_VERSION}"], check=True, capture_output=True)
    with tarfile.open(CACHE / f"snakemake-{SNAKEMAKE_VERSION}.tar.gz") as sdist:
        members = [m for m in sdist.getmembers() if m.name.startswith(f"snakemake-{SNAKEMAKE_VERSION}/tests/")]
        sdist.extractall(CACHE, members=members, filter="data")
    return tests


def python_script_rules(snakefile: str) -> list[str]:
    """The names of the rules whose `script:` is a Python file; an unnamed rule is named by its
    place among the rules, as Snakemake names it."""
    names = []
    blocks = re.split(r"^rule\b", snakefile, flags=re.M)[1:]
    for place, block in enumerate(blocks, start=1):
        name = re.match(r"\s*(\w*)\s*:", block).group(1) or str(place)  # type: ignore[union-attr]
        body = re.split(r"^\S", block.split("\n", 1)[1], maxsplit=1, flags=re.M)[0]
        script = re.search(r"script:\s*\n?\s*[\"']([^\"']+)[\"']", body)
        if script and script.group(1).endswith(".py"):
            names.append(name)
    return names


def copy_of(source: Path, into: Path) -> Workflow:
    shutil.copytree(source, into, ignore=shutil.ignore_patterns("expected-results"))
    return Workflow(into)


def produced(root: Path) -> dict[str, bytes]:
    """Every file a run left in its folder, by its path, outside Snakemake's own."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.relative_to(root).parts[0] not in SKIP
    }


@pytest.mark.parametrize("name", CHOSEN)
@pytest.mark.parametrize("slots", [1, 2])
def test_snakemake_workflow_with_sticky_scripts(tmp_path: Path, name: str, slots: int) -> None:
    source = snakemake_tests() / name
    rules = python_script_rules((source / "Snakefile").read_text())
    assert rules, f"{name} has no Python script rule"
    local = copy_of(source, tmp_path / "local")
    sticky = copy_of(source, tmp_path / "sticky")
    sticky.write("sticky_none.py", NO_STATE)
    sticky.write("sticky-conformance.yaml", f"sticky:\n  conformance: {{setup: sticky_none.py, slots: {slots}}}\n")
    configs = ("config.yaml",) if (source / "config.yaml").exists() else ()
    extra = ARGUMENTS.get(name, ())
    settings = ("--configfile", *configs, "sticky-conformance.yaml", *extra)
    resources = ("--set-resources", *(f"{rule}:sticky=conformance" for rule in rules))

    by_local = local.run(*(("--configfile", *configs) if configs else ()), *extra, executor=None, cores=3)
    assert by_local.returncode == 0, by_local.output
    by_sticky = sticky.run(*settings, *resources, cores=3)
    assert by_sticky.returncode == 0, by_sticky.output
    report = json.loads((sticky.root / ".snakemake/sticky/report.json").read_text())
    assert report["templates"]["conformance"]["invocations"] >= len(rules), report

    expected = source / "expected-results"
    for path in sorted(p for p in expected.rglob("*") if p.is_file()):
        relative = path.relative_to(expected)
        assert (sticky.root / relative).exists(), f"{name}: {relative} missing under sticky"
        assert filecmp.cmp(path, sticky.root / relative, shallow=False), f"{name}: {relative} differs"
    assert produced(sticky.root) == produced(local.root)
    if "--skip-script-cleanup" in extra:  # as Snakemake's test checks: the script's copy is kept
        assert list((sticky.root / ".snakemake" / "scripts").iterdir())
