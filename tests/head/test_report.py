"""The run report: live log lines, report.json numbers, timeline.png, end-of-run summary."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time
from pathlib import Path

from snakemake_executor_plugin_sticky.head.report import InvocationRecord
from snakemake_executor_plugin_sticky.head.report.timeline import draw_timeline

from conftest import Workflow
from helpers import LLM_TEMPLATE, ONE_TEMPLATE_SNAKEFILE, sticky_workflow

PNG = b"\x89PNG\r\n\x1a\n"


def report_of(workflow: Workflow) -> dict:
    return json.loads(workflow.read(".snakemake/sticky/report.json"))


def test_report_matches_what_the_run_did(workflow: Workflow):
    sticky_workflow(workflow, ONE_TEMPLATE_SNAKEFILE, LLM_TEMPLATE.replace("delay: 1.0", "delay: 2.0"))
    run = workflow.run("--sticky-workers", "2", "--sticky-status-interval", "0.5", "--config", "count=30", "sleep=0.1")
    assert run.returncode == 0, run.output
    report = report_of(workflow)
    assert report["version"] == 1 and report["status"] == "success"
    llm = report["templates"]["llm"]
    workers = llm["workers"]
    assert len(workers) == 2
    assert all(2.0 <= w["setup_s"] < 2.6 for w in workers), workers
    assert sum(w["invocations"] for w in workers) == llm["invocations"] == 30
    assert {w["pid"] for w in workers} == set(map(int, workflow.lines("setups-llm.txt")))
    assert all(w["retired"] and not w["lost"] and w["host"] and w["gpus"] == [] for w in workers)
    assert all(0.1 * w["invocations"] <= w["busy_s"] < 0.1 * w["invocations"] + 1.5 for w in workers)
    assert 0.1 <= llm["invocation_s"]["median"] < 0.3 and llm["invocation_s"]["count"] == 30
    setups = sorted(w["setup_s"] for w in workers)
    assert abs(llm["create_destroy_setup_s"] - 30 * (setups[0] + setups[1]) / 2) < 0.05
    assert abs(llm["setup_amortized_s_per_invocation"] - sum(setups) / 30) < 0.01
    assert abs(llm["estimated_saved_s"] - (llm["create_destroy_setup_s"] - sum(setups))) < 0.05
    assert all(0 < w["setup_started"] < w["setup_finished"] <= report["wall_s"] for w in workers)

    timeline = workflow.root / ".snakemake/sticky/timeline.png"
    assert timeline.read_bytes().startswith(PNG) and timeline.stat().st_size > 5000
    # live lines and the end-of-run summary in Snakemake's log
    assert "is building its state" in run.output and "is ready (setup 2." in run.output
    assert re.search(
        r"sticky status \| llm: workers \d+ starting / \d+ ready, invocations \d+ running / \d+ waiting / \d+ done",
        run.output,
    )
    assert "Sticky template 'llm': 2 worker(s), median setup 2." in run.output
    assert "30 invocation(s)" in run.output and "of setup saved vs create-destroy" in run.output
    # the log of a good run says nothing alarming or twice
    assert "TLS handshake failed" not in run.output and "WARNING" not in run.output, run.output
    assert run.output.count("retiring 2 worker(s)") == 1, run.output


CHECKPOINT_SNAKEFILE = """
configfile: "config.yaml"

def parts(wildcards):
    folder = checkpoints.split.get().output[0]
    return expand("out/{p}.json", p=glob_wildcards(folder + "/{p}.txt").p)

rule all:
    input: parts

checkpoint split:
    output: directory("parts")
    shell: "mkdir -p parts && for i in 1 2 3 4; do echo $i > parts/$i.txt; done"

rule infer:
    input: "parts/{p}.txt"
    output: "out/{p}.json"
    resources: sticky="llm"
    script: "scripts/record.py"
"""


def test_a_template_first_needed_after_a_checkpoint_is_reported(workflow: Workflow):
    """Its short invocations may all be done before the worker's own events would reach the run:
    the worker tells them first. Five runs: the race was lost in some."""
    sticky_workflow(workflow, CHECKPOINT_SNAKEFILE, LLM_TEMPLATE.replace("delay: 1.0", "delay: 0"))
    for _ in range(5):
        for folder in ("out", "parts"):
            shutil.rmtree(workflow.root / folder, ignore_errors=True)
        run = workflow.run("--sticky-workers", "1", cores=2)
        assert run.returncode == 0, run.output
        llm = report_of(workflow)["templates"]["llm"]
        assert llm["invocations"] == 4 and len(llm["workers"]) == 1 and llm["state_builds"] == 1, llm
        assert "Sticky template 'llm': 1 worker(s), median setup" in run.output


def test_a_run_interrupted_early_claims_no_setup_saved(workflow: Workflow):
    sticky_workflow(workflow, ONE_TEMPLATE_SNAKEFILE, LLM_TEMPLATE.replace("delay: 1.0", "delay: 0"))
    proc = workflow.popen("--sticky-workers", "2", "--config", "count=4", "sleep=600")
    deadline = time.monotonic() + 120
    while "rule infer" not in (workflow.root / "snakemake.log").read_text():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.1)
    time.sleep(1)
    os.killpg(proc.pid, signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    summary = [line for line in output.splitlines() if line.startswith("Sticky template 'llm': ")]
    assert summary and "setup saved" not in summary[-1], output
    assert "-0.0" not in output


def test_report_is_written_after_a_failed_run(workflow: Workflow):
    sticky_workflow(workflow, ONE_TEMPLATE_SNAKEFILE, LLM_TEMPLATE)
    workflow.write("scripts/record.py", "raise SystemExit(3)\n")
    run = workflow.run("--sticky-workers", "1", "--config", "count=2")
    assert run.returncode != 0
    assert "exited with status 3" in run.output
    report = report_of(workflow)
    assert report["status"] == "failed"
    assert report["templates"]["llm"]["failed_invocations"] >= 1
    assert (workflow.root / ".snakemake/sticky/timeline.png").exists()


def test_lost_worker_is_reported_and_replaced(workflow: Workflow):
    sticky_workflow(workflow, ONE_TEMPLATE_SNAKEFILE, LLM_TEMPLATE)
    proc = workflow.popen("--sticky-workers", "2", "--config", "count=12", "sleep=1")
    deadline = time.monotonic() + 60
    while len(list(workflow.root.glob("out/*.json"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    victim = int(workflow.lines("setups-llm.txt")[0])
    os.kill(victim, signal.SIGKILL)
    output, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, output
    assert len(list(workflow.root.glob("out/*.json"))) == 12
    assert "was lost" in output
    workers = report_of(workflow)["templates"]["llm"]["workers"]
    lost = [w for w in workers if w["lost"]]
    assert [w["pid"] for w in lost] == [victim]
    assert any(w["name"] == lost[0]["name"] and w["id"].endswith("#2") for w in workers), "a replacement"
    assert sum(w["invocations"] for w in workers) >= 12
    assert workflow.leftover_processes() == []


def test_timeline_stays_readable_with_many_workers(tmp_path: Path):
    workers = []
    invocations = []
    origin = 1000.0
    for i in range(50):
        template = "llm" if i < 40 else "embed"
        workers.append(
            {
                "id": f"{template}-{i}#1",
                "template": template,
                "name": f"{template}-{i}",
                "setup_started": 1.0 + i * 0.05,
                "setup_finished": 6.0 + (i % 7) * 0.5,
                "lost": i == 13,
                "gone_at": 30.0,
            }
        )
        t = 6.0 + (i % 7) * 0.5
        while t < 60:
            invocations.append(InvocationRecord(template, f"{template}-{i}#1", origin + t, origin + t + 1.5, True))
            t += 1.6
    report = {
        "status": "success",
        "wall_s": 62.0,
        "templates": {"llm": {"workers": workers[:40]}, "embed": {"workers": workers[40:]}},
    }
    draw_timeline(report, invocations, origin, tmp_path / "timeline.png")
    assert (tmp_path / "timeline.png").read_bytes().startswith(PNG)
    assert (tmp_path / "timeline.png").stat().st_size > 20000


def test_timeline_is_drawn_for_a_run_whose_workers_never_came(tmp_path: Path):
    report = {"status": "failed", "wall_s": 3.0, "templates": {"llm": {"workers": []}}}
    draw_timeline(report, [], 0.0, tmp_path / "timeline.png")
    assert (tmp_path / "timeline.png").read_bytes().startswith(PNG)


def test_dashboard_address_is_logged_and_served_on_loopback(workflow: Workflow):
    import re
    import urllib.request

    sticky_workflow(workflow, ONE_TEMPLATE_SNAKEFILE, LLM_TEMPLATE)
    proc = workflow.popen(
        "--sticky-workers", "1", "--sticky-dashboard-address", "127.0.0.1:0", "--config", "count=2", "sleep=4"
    )
    lines = []
    for line in proc.follow():
        lines.append(line)
        found = re.search(r"Dask dashboard of the sticky workers: (http://127\.0\.0\.1:\d+/status)", line)
        if found:
            with urllib.request.urlopen(found.group(1), timeout=10) as response:
                assert response.status == 200
            break
    else:
        raise AssertionError("no dashboard address logged:\n" + "".join(lines))
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, "".join(lines) + output
