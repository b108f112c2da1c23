"""Large runs as the README says: its command and the `large` profile run as they are written,
and the advice at the start of a run names settings that are installed and measure fastest."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from snakemake_executor_plugin_sticky.head.advice import FIRSTFIT_PACKAGE, LARGE_RUN_FLAGS, large_run_advice

from conftest import Workflow

ROOT = Path(__file__).resolve().parents[2]
INVOCATIONS = 240  # above the 200 from which the executor gives its advice

NOOP = {
    "Snakefile": """
        configfile: "config.yaml"
        rule all:
            input: expand("o/{i}.txt", i=range(int(config.get("count", 240))))
        rule noop:
            output: "o/{i}.txt"
            resources: sticky="noop"
            script: "noop.py"
    """,
    "config.yaml": "sticky:\n  noop:\n    setup: noop_template.py\n",
    "noop_template.py": "def setup():\n    return None\n",
    "noop.py": "open(snakemake.output[0], 'w').close()\n",
}


def readme_large_run_command() -> list[str]:
    """The flags of the README's large-run command, as a user copies them."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Large runs") :]
    block = section[section.index("```bash") + len("```bash") : section.index("```", section.index("```bash") + 7)]
    joined = re.sub(r"\\\n\s*", " ", block)
    command = next(line for line in joined.splitlines() if line.startswith("snakemake --executor sticky"))
    return shlex.split(command.split("#")[0])[1:]


def noop_workflow(workflow: Workflow) -> Workflow:
    for name, text in NOOP.items():
        workflow.write(name, text)
    return workflow


def test_the_readme_large_run_command_runs_as_written(workflow: Workflow):
    args = readme_large_run_command()
    assert "--scheduler" in args and args[args.index("--scheduler") + 1] == "firstfit", args
    noop_workflow(workflow)
    run = workflow.run(*args, "--config", f"count={INVOCATIONS}", executor=None, cores=None)
    assert run.returncode == 0, run.output
    assert len(list((workflow.root / "o").iterdir())) == INVOCATIONS
    assert "the workers wait for Snakemake" not in run.output, "the README's own flags draw no advice"


def test_the_large_profile_runs_as_written(workflow: Workflow):
    noop_workflow(workflow)
    profile = ROOT / "workflow" / "profiles" / "large"
    run = workflow.run(
        "--workflow-profile", str(profile), "--config", f"count={INVOCATIONS}", executor=None, cores=None
    )
    assert run.returncode == 0, run.output
    assert len(list((workflow.root / "o").iterdir())) == INVOCATIONS
    assert "the workers wait for Snakemake" not in run.output, run.output


ADVICE = [
    # (scheduler, subsample, starts a second, firstfit installed) -> level, or None for no advice
    (("ilp", None, 100.0, True), "info"),
    (("greedy", None, 100000.0, True), "warning"),
    (("firstfit", None, 100000.0, True), "info"),
    (("firstfit", 256, 100.0, True), "info"),
    (("firstfit", 256, 100000.0, True), None),
    (("firstfit", 256, None, True), None),  # the API sets no limit
]


@pytest.mark.parametrize("settings,level", ADVICE)
def test_the_advice_names_what_measures_fastest(settings: tuple, level: str):
    advice = large_run_advice(500, *settings)
    if level is None:
        assert advice is None
        return
    assert advice is not None and advice[0] == level
    assert LARGE_RUN_FLAGS in advice[1] and "500 sticky jobs" in advice[1]
    assert "pip install" not in advice[1]


def test_the_advice_gives_the_install_line_when_firstfit_is_missing():
    level, text = large_run_advice(500, "greedy", None, 100.0, False)
    assert level == "warning"
    assert f"pip install {FIRSTFIT_PACKAGE}" in text and "[large]" in text
    assert "greedy scheduler's rounds grow with the square" in text and "only 100 jobs start a second" in text


def test_a_small_run_gets_no_advice():
    assert large_run_advice(199, "ilp", None, 100.0, False) is None
