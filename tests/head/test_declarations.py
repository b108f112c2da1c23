"""Bad declarations are refused before any job runs, with a message naming the culprit."""

from __future__ import annotations

import pytest

from conftest import Workflow

GOOD_TEMPLATE = """
def setup(model, device="cpu"):
    open("setup-ran.txt", "a").write("x\\n")
    return model
"""

SCRIPT = """
from snakemake_executor_plugin_sticky import sticky_state
open(snakemake.output[0], "w").write(str(sticky_state(snakemake)))
"""


def snakefile(body: str = 'script: "scripts/infer.py"', template: str = "llm") -> str:
    return f"""
configfile: "config.yaml"
rule all:
    input: "out.txt"
rule first:
    output: "first.txt"
    shell: "echo first > {{output}}"
rule infer:
    input: "first.txt"
    output: "out.txt"
    resources: sticky="{template}"
    {body}
"""


def config(entry: str = "setup: templates/llm.py\n    kwargs: {model: tiny}") -> str:
    return f"sticky:\n  llm:\n    {entry}\n"


CASES = {
    "undefined template": (
        dict(snakefile=snakefile(template="lmm")),
        "Rule 'infer' asks for sticky template 'lmm', which is not defined under 'sticky:'",
    ),
    "run block": (
        dict(snakefile=snakefile(body="run:\n        print(1)")),
        "Rule 'infer' is sticky (template 'llm') but its body is run:",
    ),
    "wrapper": (
        dict(snakefile=snakefile(body='wrapper: "v3.0.0/bio/samtools/faidx"')),
        "Rule 'infer' is sticky (template 'llm') but its body is wrapper:",
    ),
    "R script": (
        dict(snakefile=snakefile(body='script: "scripts/infer.R"')),
        "its script 'scripts/infer.R' is not a Python file",
    ),
    "missing template file": (
        dict(config=config("setup: templates/nope.py")),
        "Sticky template 'llm' (config 'sticky: llm:'): setup file 'templates/nope.py' does not exist",
    ),
    "template without setup": (
        dict(template="def build(model):\n    return model\n"),
        "defines no top-level function setup(**kwargs) -> state",
    ),
    "template with a syntax error": (
        dict(template="def setup(model:\n"),
        "has a syntax error at line 1",
    ),
    "unexpected kwarg": (
        dict(config=config("setup: templates/llm.py\n    kwargs: {model: tiny, modle: x}")),
        "'kwargs' do not match setup(model, device)",
    ),
    "missing kwarg": (
        dict(config=config("setup: templates/llm.py\n    kwargs: {device: cpu}")),
        "missing required argument(s) model",
    ),
    "negative gpus": (
        dict(config=config("setup: templates/llm.py\n    kwargs: {model: tiny}\n    gpus: -1")),
        "'gpus' must be an integer >= 0, got -1",
    ),
    "zero slots": (
        dict(config=config("setup: templates/llm.py\n    kwargs: {model: tiny}\n    slots: 0")),
        "'slots' must be an integer >= 1, got 0",
    ),
    "text slots": (
        dict(config=config("setup: templates/llm.py\n    kwargs: {model: tiny}\n    slots: two")),
        "'slots' must be an integer >= 1, got 'two'",
    ),
    "unknown template key": (
        dict(config=config("setup: templates/llm.py\n    kwargs: {model: tiny}\n    gpu: 1")),
        "has unknown key(s) 'gpu'",
    ),
    "more GPUs than visible": (
        dict(config=config("setup: templates/llm.py\n    kwargs: {model: tiny}\n    gpus: 1")),
        "Sticky template 'llm' asks for 1 worker(s) x 1 GPU(s), but 0 GPU(s) are visible",
    ),
    "bad setting": (
        dict(args=["--sticky-setup-attempts", "0"]),
        "--sticky-setup-attempts must be at least 1, got 0",
    ),
    "zero workers": (dict(args=["--sticky-workers", "0"]), "--sticky-workers must be at least 1, got 0"),
    "negative loss budget": (
        dict(args=["--sticky-max-worker-losses", "-1"]),
        "--sticky-max-worker-losses must not be negative, got -1",
    ),
    "zero timeout": (
        dict(args=["--sticky-invocation-timeout", "0"]),
        "--sticky-invocation-timeout must be positive, got 0",
    ),
    "negative grace": (
        dict(args=["--sticky-preempt-grace", "-5"]),
        "--sticky-preempt-grace must not be negative, got -5",
    ),
    "template renamed by --set-resources": (
        dict(args=["--set-resources", "infer:sticky=other"]),
        "Rule 'infer' asks for sticky template 'other'",
    ),
    "benchmark": (
        dict(snakefile=snakefile(body='benchmark: "bench.txt"\n    script: "scripts/infer.py"')),
        "Rule 'infer' is sticky (template 'llm'): benchmark: is not supported for sticky rules.",
    ),
    "pipe group": (
        dict(snakefile=snakefile().replace('output: "first.txt"', 'output: pipe("first.txt")')),
        "Rule 'infer' is sticky (template 'llm') but runs in a pipe or service group",
    ),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_bad_declaration_is_refused_before_any_job(workflow: Workflow, case: str):
    spec, message = CASES[case]
    workflow.write("Snakefile", spec.get("snakefile", snakefile()))
    workflow.write("config.yaml", spec.get("config", config()))
    workflow.write("templates/llm.py", spec.get("template", GOOD_TEMPLATE))
    workflow.write("scripts/infer.py", SCRIPT)
    workflow.write("scripts/infer.R", "cat('hi')\n")
    dry = workflow.run("--dry-run", *spec.get("args", []), timeout=60)
    assert dry.returncode != 0 and message in dry.output, f"a dry run refuses it as the run does:\n{dry.output}"
    run = workflow.run(*spec.get("args", []), timeout=60)
    assert run.returncode != 0
    assert message in run.output, run.output
    assert "starting worker" not in run.output, "refused before any worker starts"
    assert not (workflow.root / "first.txt").exists(), "no job may run before the error"
    assert not (workflow.root / "setup-ran.txt").exists()
    assert workflow.leftover_processes() == []


def test_good_declaration_runs(workflow: Workflow):
    """The baseline the cases above break: the same files, unbroken, succeed."""
    workflow.write("Snakefile", snakefile())
    workflow.write("config.yaml", config())
    workflow.write("templates/llm.py", GOOD_TEMPLATE)
    workflow.write("scripts/infer.py", SCRIPT)
    assert workflow.run("--dry-run").returncode == 0
    run = workflow.run()
    assert run.returncode == 0, run.output
    assert workflow.read("out.txt") == "tiny"
