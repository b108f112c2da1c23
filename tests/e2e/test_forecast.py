"""`snakemake -n --executor sticky` forecasts each template's part of the run from the runs before
it in the same folder: without history it says what it knows; after a run it gives setup,
invocation times and makespans, and the next run's report puts the forecast beside what happened."""

from __future__ import annotations

import json

import pytest

from conftest import Workflow

SNAKEFILE = """
configfile: "config.yaml"
N = int(config.get("count", 6))

rule all:
    input: expand("out/{i}.txt", i=range(N))

rule nap:
    output: "out/{i}.txt"
    resources: sticky="t"
    script: "nap.py"
"""

TEMPLATE = "import time\n\ndef setup():\n    time.sleep(1.0)\n    return {}\n"
SCRIPT = "import time\ntime.sleep(0.3)\nopen(snakemake.output[0], 'w').write('done\\n')\n"


def test_a_dry_run_forecasts_from_the_runs_before_it(workflow: Workflow):
    workflow.write("Snakefile", SNAKEFILE)
    workflow.write("config.yaml", "sticky:\n  t: {setup: t.py}\n")
    workflow.write("t.py", TEMPLATE)
    workflow.write("nap.py", SCRIPT)

    dry = workflow.run("-n", "--sticky-workers", "2", cores=4)
    assert dry.returncode == 0, dry.output
    assert "Sticky forecast, template 't': 6 invocation(s) (6 of rule nap) on 2 worker(s)" in dry.output, dry.output
    assert "no earlier run of this template" in dry.output, dry.output

    run = workflow.run("--sticky-workers", "2", cores=4)
    assert run.returncode == 0, run.output
    history = [json.loads(line) for line in workflow.read(".snakemake/sticky/history.jsonl").splitlines()]
    assert len(history) == 1 and history[0]["templates"]["t"]["rules"]["nap"]["count"] == 6, history

    dry = workflow.run("-n", "--sticky-workers", "3", "--forcerun", "nap", "--config", "count=18", cores=6)
    assert dry.returncode == 0, dry.output
    assert "18 invocation(s) (18 of rule nap) on 3 worker(s)" in dry.output, dry.output
    assert "from 1 earlier run(s) of the same template" in dry.output, dry.output
    assert "makespan: sticky" in dry.output and "create-destroy" in dry.output, dry.output

    run = workflow.run("--sticky-workers", "3", "--forcerun", "nap", "--config", "count=18", cores=6)
    assert run.returncode == 0, run.output
    report = json.loads(workflow.read(".snakemake/sticky/report.json"))["templates"]["t"]
    forecast = report["forecast"]
    assert forecast["runs"] == 1 and forecast["sticky_s"] > 0 and forecast["measured_sticky_s"] > 0, forecast
    expected = (forecast["measured_sticky_s"] - forecast["sticky_s"]) / forecast["sticky_s"]
    assert forecast["error"] == pytest.approx(expected, abs=1e-3)


@pytest.mark.usefixtures("slurm")
def test_on_a_batch_system_the_history_keeps_queue_waits_and_the_dry_run_tells_them(workflow: Workflow):
    workflow.write("Snakefile", SNAKEFILE)
    workflow.write("config.yaml", "sticky:\n  t: {setup: t.py}\n")
    workflow.write("t.py", TEMPLATE)
    workflow.write("nap.py", SCRIPT)
    on_slurm = ("--sticky-cluster", "slurm", "--sticky-interface", "lo", "--sticky-max-workers", "1")
    run = workflow.run(*on_slurm, "--sticky-queue", "debug", cores=1)
    assert run.returncode == 0, run.output
    report = json.loads(workflow.read(".snakemake/sticky/report.json"))["templates"]["t"]
    assert report["partitions"] == ["debug"] and report["queue_wait_s"]["count"] == 1, report
    (line,) = [json.loads(line) for line in workflow.read(".snakemake/sticky/history.jsonl").splitlines()]
    assert line["templates"]["t"]["queue_wait_s"]["count"] == 1 and line["templates"]["t"]["partitions"] == ["debug"]
    dry = workflow.run("-n", *on_slurm, "--sticky-queue", "debug", "--forcerun", "nap", cores=1)
    assert dry.returncode == 0, dry.output
    assert "in the queue before it starts (median of 1 job(s) in 1 run(s) on debug)" in dry.output, dry.output
    other = workflow.run("-n", *on_slurm, "--forcerun", "nap", cores=1)
    assert "queue wait: unknown (no earlier worker job on partition(s) default)" in other.output, other.output
