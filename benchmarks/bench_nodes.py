"""The scale-out section of `make bench` on the multi-node cluster (.ci/netcluster): a sleepy
workload on 1, 2 and 3 compute nodes (jobs per second, makespan against the ideal), and staging
a model on every node (from the shared source, or from a peer)."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
NETCLUSTER = ROOT / ".ci" / "netcluster"
CONF = "/etc/slurm-netcluster/slurm.conf"
NODE_LOCAL = "/var/tmp/netcluster-local"

SNAKEFILE = """
configfile: "config.yaml"
rule all:
    input: expand("out/{i}.txt", i=range(int(config["count"])))
rule sleepy:
    output: "out/{i}.txt"
    resources: sticky="model"
    script: "scripts/sleepy.py"
"""

TEMPLATE = """
import os, socket, time
from snakemake_executor_plugin_sticky import stage

def setup(load_s, source=None):
    time.sleep(load_s)  # a model's load
    local = str(stage(source)) if source else None
    return {"host": socket.gethostname(), "local": local}
"""

SCRIPT = """
import time
from snakemake_executor_plugin_sticky import sticky_state
state = sticky_state(snakemake)
time.sleep(float(snakemake.config["sleep"]))
open(snakemake.output[0], "w").write(state["host"])
"""


def unavailable() -> Optional[str]:
    """Why the section cannot run here, or None."""
    if not Path(CONF).exists() or os.geteuid() != 0:
        return "no multi-node cluster: sudo .ci/netcluster up 3"
    listed = subprocess.run([str(NETCLUSTER), "nodes"], capture_output=True, text=True).stdout.split("\n")
    if len([line for line in listed if line.strip()]) < 3:
        return "the multi-node cluster has fewer than 3 nodes: sudo .ci/netcluster up 3"
    return None


def workflow(folder: Path, load_s: float, source: Optional[Path]) -> None:
    """A fresh sleepy workflow whose template loads for `load_s` and stages `source`."""
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "templates").mkdir(parents=True)
    (folder / "scripts").mkdir()
    (folder / "Snakefile").write_text(SNAKEFILE)
    kwargs = {"load_s": load_s, **({"source": str(source)} if source else {})}
    config = {"sticky": {"model": {"setup": "templates/model.py", "kwargs": kwargs}}}
    (folder / "config.yaml").write_text(json.dumps(config))
    (folder / "templates" / "model.py").write_text(TEMPLATE)
    (folder / "scripts" / "sleepy.py").write_text(SCRIPT)


def run_on_nodes(folder: Path, nodes: int, count: int, sleep_s: float, extra: list[str]) -> tuple[float, dict]:
    """One run with at most `nodes` worker jobs (one per node): its wall time and its report."""
    command = [sys.executable, "-m", "snakemake", "--executor", "sticky", "--cores", "1", "--jobs", str(4 * nodes)]
    command += ["--sticky-cluster", "slurm", "--sticky-max-workers", str(nodes), "--sticky-idle-timeout", "5"]
    command += [*extra, "--config", f"count={count}", f"sleep={sleep_s}"]
    env = dict(os.environ, SLURM_CONF=CONF, PYTHONUNBUFFERED="1")
    env.pop("SNAKEMAKE_PROFILE", None)
    started = time.perf_counter()
    done = subprocess.run(command, cwd=folder, capture_output=True, text=True, env=env, timeout=1800)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed in {folder}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return wall, json.loads((folder / ".snakemake" / "sticky" / "report.json").read_text())


def sleepy(folder: Path, node_counts: list[int], count: int, sleep_s: float, load_s: float, repeats: int) -> dict:
    """Makespan and jobs per second on 1, 2, 3 nodes, against the ideal: every node loads once
    and then sleeps through its share of the invocations."""
    rows = {}
    for nodes in node_counts:
        walls = []
        for _ in range(repeats):
            workflow(folder, load_s, None)
            wall, report = run_on_nodes(folder, nodes, count, sleep_s, [])
            walls.append(wall)
            hosts = {w["host"] for w in report["templates"]["model"]["workers"]}
        ideal = load_s + count * sleep_s / nodes
        median = statistics.median(walls)
        rows[str(nodes)] = {
            "wall_s": walls,
            "median_s": median,
            "jobs_per_s": count / median,
            "ideal_s": ideal,
            "efficiency": ideal / median,
            "hosts": sorted(hosts),
        }
        print(f"  {nodes} node(s): {median:.1f} s ({count / median:.2f} jobs/s; ideal {ideal:.1f} s)", flush=True)
    return {"invocations": count, "sleep_s": sleep_s, "load_s": load_s, "by_nodes": rows}


def staging(folder: Path, size_mb: int, readers_options: list[int]) -> dict:
    """A model staged on three nodes: how long each copy took, and from where."""
    source = folder.parent / "shared-model"
    shutil.rmtree(source, ignore_errors=True)
    source.mkdir(parents=True)
    for i in range(4):
        (source / f"shard-{i}.bin").write_bytes(os.urandom(size_mb * 2**20 // 4))
    rows = {}
    for readers in readers_options:
        workflow(folder, 0.0, source)
        extra = ["--sticky-cache-dir", f"{NODE_LOCAL}/readers-{readers}-{time.time_ns()}"]
        extra += ["--sticky-stage-readers", str(readers)]
        wall, report = run_on_nodes(folder, 3, 6, 0.5, extra)
        stagings = [s for w in report["templates"]["model"]["workers"] for s in w["stagings"]]
        rows[str(readers)] = {
            "wall_s": wall,
            "copies": [{"from": s["from"].split()[0], "seconds": s["seconds"]} for s in stagings],
        }
        print(
            f"  readers {readers}: "
            + ", ".join(f"{c['from']} {c['seconds']:.2f} s" for c in rows[str(readers)]["copies"])
        )
    return {"size_mb": size_mb, "by_readers": rows}


def nodes_section(folder: Path, quick: bool, repeats: int) -> dict:
    """The whole section, or the reason it is skipped."""
    why_not = unavailable()
    if why_not is not None:
        print(f"nodes: skipped ({why_not})", flush=True)
        return {"skipped": why_not}
    subprocess.run([str(NETCLUSTER), "up", "3"], capture_output=True, check=True)
    count = 24 if quick else 96
    return {
        "sleepy": sleepy(folder / "sleepy", [1, 2, 3], count, 1.0, 3.0, 1 if quick else repeats),
        "staging": staging(folder / "staging", 64 if quick else 256, [1, 3]),
    }


def nodes_markdown(n: dict) -> list[str]:
    """The section's tables."""
    if "skipped" in n:
        return [f"**Scale-out on the multi-node cluster**: skipped ({n['skipped']}).", ""]
    s = n["sleepy"]
    lines = [
        f"**Scale-out on the multi-node cluster** ({s['invocations']} invocations of {s['sleep_s']:g} s, "
        f"a template that loads in {s['load_s']:g} s; one worker job per node):",
        "",
        "| nodes | makespan | jobs/s | ideal | ideal / makespan | hosts |",
        "|---|---|---|---|---|---|",
    ]
    for nodes, row in s["by_nodes"].items():
        lines.append(
            f"| {nodes} | {row['median_s']:.1f} s | {row['jobs_per_s']:.2f} | {row['ideal_s']:.1f} s | "
            f"{row['efficiency']:.0%} | {', '.join(row['hosts'])} |"
        )
    t = n["staging"]
    lines += ["", f"Staging a {t['size_mb']} MB model on three nodes:", "", "| readers | copies |", "|---|---|"]
    for readers, row in t["by_readers"].items():
        copies = ", ".join(f"{c['from']} {c['seconds']:.2f} s" for c in row["copies"])
        lines.append(f"| {readers} | {copies} |")
    return lines + [""]
