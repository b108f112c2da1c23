"""Many hosts: workers as Slurm jobs on the compute nodes of a multi-node cluster on this machine
(.ci/netcluster: each node its own network, hostname and node-local scratch folder), the
scheduler on the head, reached over TLS through the bridge. Nodes are cut off the network,
frozen, crashed, and their jobs requeued, mid-run."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from conftest import NETCLUSTER, NETCLUSTER_CONF, Background, Workflow
from helpers import (
    COUNT_OPENS,
    HOLDS_THE_LOCK,
    LLM_TEMPLATE,
    ONE_TEMPLATE_SNAKEFILE,
    clear_fidelity_results,
    digest_of,
    fidelity_results,
    fidelity_workflow,
    make_model,
    sticky_workflow,
    wait_for,
)

ENV = {"SLURM_CONF": NETCLUSTER_CONF}
NODE_LOCAL = "/var/tmp/netcluster-local"
ON_NODES = ("--sticky-cluster", "slurm", "--sticky-max-workers", "3", "--jobs", "3")

SNAKEFILE = """
configfile: "config.yaml"
rule all:
    input: expand("out/{i}.txt", i=range(int(config.get("count", 9))))
rule use:
    output: "out/{i}.txt"
    resources: sticky="model"
    script: "scripts/use.py"
"""

TEMPLATE = (
    """
import hashlib, os, socket, sys
from snakemake_executor_plugin_sticky import stage

SOURCE = {source!r}

"""
    + COUNT_OPENS
    + """
def setup():
    sys.addaudithook(count_opens)
    local = stage(SOURCE) if SOURCE else None
    digest = hashlib.sha256()
    for name in sorted(os.listdir(local)) if local else ():
        with open(os.path.join(local, name), "rb") as f:
            digest.update(f.read())
    return {{"host": socket.gethostname(), "pid": os.getpid(), "local": str(local), "digest": digest.hexdigest()}}
"""
)

USE = """
import json, os, socket, time
from snakemake_executor_plugin_sticky import sticky_state
state = sticky_state(snakemake)
os.makedirs("started", exist_ok=True)
open(f"started/{snakemake.wildcards.i}.{socket.gethostname()}", "w").close()
time.sleep(float(snakemake.config.get("sleep", 0.5)))
with open(snakemake.output[0], "w") as f:
    json.dump({k: state[k] for k in ("host", "pid", "local", "digest")}, f)
"""


def node_workflow(workflow: Workflow, source: str = "") -> None:
    workflow.write("Snakefile", SNAKEFILE)
    workflow.write("config.yaml", "sticky:\n  model:\n    setup: templates/model.py\n")
    workflow.write("templates/model.py", TEMPLATE.format(source=source))
    workflow.write("scripts/use.py", USE)


def busy_on_node3(workflow: Workflow, *args: str) -> Background:
    """A run on the three nodes, once one of its invocations has started on node3."""
    node_workflow(workflow)
    proc = workflow.popen(*ON_NODES, *args, cores=1, env=ENV)
    wait_for(lambda: any(p.suffix == ".node3" for p in (workflow.root / "started").glob("*")), timeout=180)
    return proc


def cluster(*args: str) -> str:
    return subprocess.run([str(NETCLUSTER), *args], capture_output=True, text=True, check=True).stdout


def outputs(workflow: Workflow) -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in (workflow.root / "out").glob("*.txt")}


def node_slurmd(node: str) -> int:
    """The pid of the node's slurmd: it holds the node's namespaces."""
    for pid in cluster("pids", node).split():
        if Path(f"/proc/{pid}/comm").read_text().strip() == "slurmd":
            return int(pid)
    raise AssertionError(f"{node} runs no slurmd")


def files_on(node: str, folder: str) -> list[str]:
    """The files under a folder as the node sees it (its own mount namespace)."""
    listed = subprocess.run(
        ["nsenter", f"--mount=/proc/{node_slurmd(node)}/ns/mnt", "find", folder, "-type", "f"],
        capture_output=True,
        text=True,
        check=True,
    )
    return listed.stdout.split()


def processes_of(node: str) -> list[str]:
    """What runs on the node besides its slurmd (a process that ends between the listing and the
    read of its name is not running)."""
    names = []
    for pid in cluster("pids", node).split():
        try:
            names.append(Path(f"/proc/{pid}/comm").read_text().strip())
        except FileNotFoundError:
            continue
    return [name for name in names if name != "slurmd"]


def queue_empty(wait_s: float = 90.0) -> bool:
    deadline = time.monotonic() + wait_s
    while True:
        listing = subprocess.run(["squeue", "-h"], capture_output=True, text=True, env=ENV).stdout
        if not listing.strip():
            return True
        if time.monotonic() > deadline:
            print(listing)
            return False
        time.sleep(1)


def test_workers_on_three_nodes_stage_a_copy_each_reading_the_source_once(workflow: Workflow, netcluster, tmp_path):
    source = make_model(tmp_path / "shared-fs" / "model", size_mb=2)
    node_workflow(workflow, str(source))
    run = workflow.run(
        *ON_NODES, "--sticky-cache-dir", NODE_LOCAL, "--sticky-stage-readers", "1", cores=1, env=ENV, timeout=300
    )
    assert run.returncode == 0, run.output
    assert "scheduler at tls://198.18.0.1:" in run.output and "from the route to compute node 198.18.0." in run.output
    done = outputs(workflow)
    assert len(done) == 9 and {o["host"] for o in done.values()} == {"node1", "node2", "node3"}
    assert {o["digest"] for o in done.values()} == {digest_of(source)}
    report = json.loads(workflow.read(".snakemake/sticky/report.json"))
    origins = sorted(s["from"].split()[0] for w in report["templates"]["model"]["workers"] for s in w["stagings"])
    assert origins == ["peer", "peer", "shared"], "one node read the shared source, the others copied from a peer"
    assert sorted(workflow.lines("opens.txt")) == sorted(str(p) for p in source.iterdir()), "read once in all"
    for node in ("node1", "node2", "node3"):
        local = {o["local"] for o in done.values() if o["host"] == node}
        assert len(local) == 1 and local.pop().startswith(NODE_LOCAL)
        assert sum(name.endswith(".bin") for name in files_on(node, NODE_LOCAL)) >= 4, f"{node} holds its own copy"
    assert not list(Path(NODE_LOCAL).rglob("shard-*.bin")), "the copies are node-local: the head sees none"
    assert queue_empty()
    assert workflow.leftover_processes() == []


def test_a_node_cut_off_and_frozen_mid_run_is_given_up_and_rewrites_nothing_when_it_resumes(
    workflow: Workflow, netcluster
):
    proc = busy_on_node3(workflow, "--sticky-node-timeout", "10", "--config", "count=18", "sleep=3")
    try:
        cluster("cut", "node3")
        cluster("freeze", "node3")
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, output
        assert (
            "Sticky worker model-1-" in output
            and "left the run without retiring" in output
            and "goes on: cancelling it" in output
        )
        done = outputs(workflow)
        assert len(done) == 18 and "node3" not in {o["host"] for o in done.values()}
        before = {p.name: (p.stat().st_mtime_ns, p.read_text()) for p in (workflow.root / "out").glob("*.txt")}
    finally:
        cluster("heal", "node3")
        cluster("thaw", "node3")
    wait_for(lambda: processes_of("node3") == [], timeout=120)
    after = {p.name: (p.stat().st_mtime_ns, p.read_text()) for p in (workflow.root / "out").glob("*.txt")}
    assert after == before, "the node that came back rewrote no output"
    assert not list((workflow.root / ".snakemake" / "sticky" / "runs").glob("*")), "no attempt folder is left"
    assert queue_empty()
    assert workflow.leftover_processes() == []


def test_a_node_that_crashes_mid_run_loses_nothing_and_leaves_nothing(workflow: Workflow, netcluster):
    proc = busy_on_node3(workflow, "--config", "count=18", "sleep=2")
    try:
        cluster("crash", "node3")
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, output
        assert "left the run without retiring" in output
        assert len(outputs(workflow)) == 18
    finally:
        cluster("up", str(len(netcluster)))  # the node's slurmd starts again
    assert processes_of("node3") == []
    assert queue_empty()
    assert workflow.leftover_processes() == []


def test_a_worker_job_that_slurm_requeues_mid_run_loses_nothing_and_leaves_nothing_queued(
    workflow: Workflow, netcluster
):
    proc = busy_on_node3(workflow, "--sticky-preempt-grace", "2", "--config", "count=18", "sleep=2")
    listing = subprocess.run(["squeue", "-h", "-w", "node3", "-o", "%i"], capture_output=True, text=True, env=ENV)
    job = listing.stdout.split()[0]
    subprocess.run(["scontrol", "requeue", job], check=True, env=ENV)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    assert len(outputs(workflow)) == 18
    assert queue_empty()
    assert workflow.leftover_processes() == []


def test_scripts_see_their_outputs_on_the_nodes_as_under_the_local_executor(workflow: Workflow, netcluster):
    fidelity_workflow(workflow)
    local = workflow.run("--keep-going", executor="local", cores=2)
    assert local.returncode != 0 and local.output.count("Error in rule crash") == 2, local.output
    expected = fidelity_results(workflow)
    clear_fidelity_results(workflow)
    run = workflow.run(*ON_NODES, "--keep-going", "--sticky-invocation-crashes", "1", cores=1, env=ENV, timeout=300)
    assert run.returncode != 0 and run.output.count("Error in rule crash") == 2, run.output
    assert fidelity_results(workflow) == expected
    assert queue_empty()
    assert workflow.leftover_processes() == []


def test_a_node_busy_holding_the_interpreter_lock_for_twice_the_node_timeout_is_not_given_up(
    workflow: Workflow, netcluster
):
    sticky_workflow(workflow, ONE_TEMPLATE_SNAKEFILE, LLM_TEMPLATE.replace("delay: 1.0", "delay: 0.2"))
    workflow.write("scripts/record.py", HOLDS_THE_LOCK)
    run = workflow.run(
        *ON_NODES, "--sticky-node-timeout", "10", "--config", "count=3", "hold=20", cores=1, env=ENV, timeout=300
    )
    assert run.returncode == 0, run.output
    assert "left the run without retiring" not in run.output and "was lost" not in run.output, run.output
    assert len(set(workflow.lines("setups-llm.txt"))) <= 3, "no worker job was given up and replaced"
    assert queue_empty()
    assert workflow.leftover_processes() == []
