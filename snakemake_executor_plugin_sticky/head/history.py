"""What earlier runs measured, kept for the forecast of the next (forecast.py).

At its end each run adds one line to `.snakemake/sticky/history.jsonl`: the machine, and per
template its identity, workers, slots, GPUs, setup times, the mean and largest batch of its model
calls, on a batch system its jobs' waits in the queue and their partitions, and per rule the
count and times of its invocations. The file keeps the last `KEEP` runs; runs that end at once
each add their line whole (under a lock, written to a new file that replaces the old).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import statistics
from pathlib import Path
from typing import Any, Iterable, Optional

from ..templates import TemplateSpec
from ..wire import HISTORY, read_history, write_atomically
from .declarations import sticky_name
from .forecast import Forecast, Plan, forecast
from .gpus import GpuPlan, visible_gpus

KEEP = 200  # runs


def entry(report: dict[str, Any], cluster: str, cpus: Optional[int]) -> dict[str, Any]:
    """One run's line, from its report.json content; `cpus`: the cores its local workers shared
    (None where workers had nodes of their own)."""
    templates = {}
    for name, t in report["templates"].items():
        setups = [w["setup_s"] for w in t["workers"] if w.get("setup_s") is not None]
        templates[name] = {
            "identity": t["identity"],
            "workers": len(t["workers"]),
            "slots": t["slots"],
            "gpus_per_worker": t["gpus_per_worker"],
            "setup_s": [round(s, 3) for s in setups],
            "rules": t.get("rules", {}),
            "invocations": t["invocations"],
            "sticky_s": t.get("sticky_s"),
            "staged": sorted({s["source"] for w in t["workers"] for s in w.get("stagings", [])}),
            "batch": {k: v for k, v in (t.get("model_calls") or {}).items() if k in ("mean_batch", "max_batch")},
            "queue_wait_s": {k: v for k, v in (t.get("queue_wait_s") or {}).items() if k in ("median", "count")},
            "partitions": t.get("partitions", []),
        }
    return {
        "finished": report["finished"],
        "wall_s": report["wall_s"],
        "host": socket.gethostname(),
        "cpus": cpus,
        "cluster": cluster,
        "templates": templates,
    }


def record(workdir: Path, line: dict[str, Any]) -> None:
    """Add a run's line, keeping the last KEEP."""
    path = workdir / HISTORY
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        kept = read_history(workdir)[-(KEEP - 1) :] + [line]
        write_atomically(path, "".join(json.dumps(run) + "\n" for run in kept))


def rule_times(durations_by_rule: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """Per rule: how many invocations, and their mean and median seconds."""
    return {
        rule: {
            "count": len(values),
            "mean_s": round(statistics.fmean(values), 4),
            "median_s": round(statistics.median(values), 4),
        }
        for rule, values in durations_by_rule.items()
        if values
    }


def forecasts_for(jobs: Iterable[Any], used: dict[str, TemplateSpec], settings: Any, workdir: Path) -> list[Forecast]:
    """The forecast of each template the run's jobs use, from the history of this folder."""
    counts: dict[str, dict[str, int]] = {}
    for job in jobs:
        name = sticky_name(job)
        if name in used:
            rules = counts.setdefault(name, {})
            rules[job.rule.name] = rules.get(job.rule.name, 0) + 1
    runs = read_history(workdir)
    return [forecast(plan_of(used[name], rules, settings), runs) for name, rules in counts.items()]


def plan_of(template: TemplateSpec, counts: dict[str, int], settings: Any) -> Plan:
    """A template's part of the run as its settings make it: workers, slots, GPUs, walltime."""
    walltime: Optional[float] = None
    partitions: tuple[str, ...] = ()
    if settings.scheduler:  # attach mode: the workers someone started; the template's count, or one
        workers = template.workers or settings.workers or 1
    elif settings.cluster != "local":
        from .engines.batch_systems import walltime_seconds
        from .engines.jobqueue import pools_of

        pools = pools_of(template, settings)
        workers = sum(p.max_workers for p in pools)
        walltime = float(walltime_seconds(settings.walltime))
        partitions = tuple(sorted({p.queue or "default" for p in pools}))
    else:
        workers = GpuPlan(visible_gpus(), None).worker_count(template, settings.workers)
    cpus = os.cpu_count() if settings.cluster == "local" and not settings.scheduler else None
    return Plan(
        template.name, template.identity, counts, workers, template.slots, template.gpus, walltime, cpus, partitions
    )
