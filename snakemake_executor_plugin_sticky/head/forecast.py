"""The forecast of a run, before it runs: `snakemake -n --executor sticky` prints it per template.

A pure core: what the dry run knows (a `Plan`: invocations per rule, workers, slots, GPUs, a
worker job's walltime) and what earlier runs measured (history.py) give a `Forecast`:

- setup: the median of the template's earlier setups (CPU workers of one machine beyond its cores
  set up side by side, each slower in proportion);
- each rule's invocation time: the mean of its earlier invocations (a rule not seen before takes
  the mean of the template's other rules);
- the work: the invocations times their rule's time; spread over workers x slots (CPU workers of
  one machine: over its cores at most);
- the plugin's own cost per invocation: what earlier runs took beyond their setup and spread
  work, per invocation (dispatch, scheduling rounds), the median of those runs;
- sticky makespan = setup + work / (workers x slots) + cost x invocations;
- create-destroy makespan = (setup + mean invocation) x invocations / (workers x slots): every
  job loads the state itself, with the same resources;
- GPU-hours = workers x GPUs per worker x sticky makespan;
- on a batch system, whether one worker's share (setup, then its part of the work) fits the
  walltime of its job, and how long its job waits in the queue first (the median wait of earlier
  runs' jobs on the same partitions; the makespan above counts from the first worker's start);
- the mean batch of the template's model calls in earlier runs, as they measured it.

Earlier runs of the same identity are preferred; otherwise runs of a template of that name
count, and the forecast says so. Without any, it says what it knows (the counts) and what it
would need.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any, Optional

RECENT = 5  # earlier runs a forecast draws on at most (the latest)


@dataclass(frozen=True)
class Plan:
    """What the dry run knows of one template's part of the run."""

    template: str
    identity: str
    counts: dict[str, int]  # rule -> invocations to run
    workers: int
    slots: int = 1
    gpus: int = 0
    walltime_s: Optional[float] = None  # a worker job's, on a batch system
    cpus: Optional[int] = None  # the cores local CPU workers share (None: each has its own node)
    partitions: tuple[str, ...] = ()  # a batch system's partitions (queues) its pools ask for


@dataclass
class Forecast:
    """The forecast of one template, and where its figures come from."""

    plan: Plan
    basis: str
    runs: int = 0
    setup_s: Optional[float] = None
    rule_s: dict[str, float] = field(default_factory=dict)
    sticky_s: Optional[float] = None
    create_destroy_s: Optional[float] = None
    gpu_hours: Optional[float] = None
    worker_share_s: Optional[float] = None
    fits_walltime: Optional[bool] = None
    queue_wait_s: Optional[float] = None  # a worker job's wait before it starts, on a batch system
    queue_basis: str = ""
    mean_batch: Optional[float] = None  # of the model calls of earlier runs

    @property
    def invocations(self) -> int:
        return sum(self.plan.counts.values())


def earlier(plan: Plan, runs: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
    """The template's entries in the latest earlier runs (with their run's machine), and which
    kind they are."""
    entries = [
        {**r["templates"][plan.template], "host": r.get("host"), "cluster": r.get("cluster"), "cpus": r.get("cpus")}
        for r in runs
        if plan.template in r.get("templates", {})
    ]
    same = [e for e in entries if e.get("identity") == plan.identity]
    if same:
        return same[-RECENT:], "the same template"
    return entries[-RECENT:], "a template of this name with other code, kwargs or environment"


def crowding(workers: int, gpus: int, cpus: Optional[int]) -> float:
    """How much slower each CPU worker of one machine runs when there are more than its cores."""
    return max(1.0, workers / cpus) if not gpus and cpus else 1.0


def rule_means(entries: list[dict[str, Any]]) -> dict[str, float]:
    """Each rule's mean invocation time over the entries, weighted by their counts."""
    totals: dict[str, list[float]] = {}
    for e in entries:
        for rule, times in e.get("rules", {}).items():
            seen = totals.setdefault(rule, [0.0, 0.0])
            seen[0] += times["mean_s"] * times["count"]
            seen[1] += times["count"]
    return {rule: total / count for rule, (total, count) in totals.items() if count}


def spread_work(plan: Plan, times: dict[str, float]) -> float:
    """The plan's work, each rule's invocations at its time (others' mean where unseen)."""
    fallback = statistics.fmean(times.values())
    return sum(n * times.get(rule, fallback) for rule, n in plan.counts.items())


def own_cost(entries: list[dict[str, Any]]) -> float:
    """The plugin's own seconds per invocation in earlier runs: their span beyond setup and spread work."""
    costs = []
    for e in entries:
        work = sum(t["mean_s"] * t["count"] for t in e.get("rules", {}).values())
        lanes = max(1, e["workers"]) * max(1, e["slots"])
        if not e.get("gpus_per_worker") and e.get("cpus"):
            lanes = min(lanes, e["cpus"])
        if e.get("sticky_s") and e.get("invocations") and e.get("setup_s"):
            beyond = e["sticky_s"] - statistics.median(e["setup_s"]) - work / lanes
            costs.append(max(0.0, beyond) / e["invocations"])
    return statistics.median(costs) if costs else 0.0


def forecast(plan: Plan, runs: list[dict[str, Any]]) -> Forecast:
    """The forecast of a plan, from the earlier runs recorded (oldest first)."""
    entries, kind = earlier(plan, runs)
    setups = [s for e in entries for s in e.get("setup_s", [])]
    times = rule_means(entries)
    if not entries or not setups or not times:
        return Forecast(plan, "no earlier run of this template: nothing to forecast from (a run records one)")
    hosts = sorted({f"{e['host']} ({e['cluster']})" for e in entries})
    result = Forecast(plan, f"{len(entries)} earlier run(s) of {kind}, on {', '.join(hosts)}", runs=len(entries))
    # setups run side by side: on a machine with fewer cores than CPU workers, each is slower
    before = statistics.median(crowding(e["workers"], e.get("gpus_per_worker", 0), e.get("cpus")) for e in entries)
    result.setup_s = statistics.median(setups) * crowding(plan.workers, plan.gpus, plan.cpus) / before
    result.rule_s = {rule: times.get(rule, statistics.fmean(times.values())) for rule in plan.counts}
    lanes = max(1, plan.workers) * max(1, plan.slots)
    if not plan.gpus and plan.cpus:  # CPU workers of one machine share its cores
        lanes = min(lanes, plan.cpus)
    work = spread_work(plan, times)
    n = result.invocations
    result.sticky_s = result.setup_s + work / lanes + own_cost(entries) * n
    result.create_destroy_s = (result.setup_s * n + work) / lanes
    result.gpu_hours = plan.workers * plan.gpus * result.sticky_s / 3600
    result.worker_share_s = result.setup_s + work / lanes
    if plan.walltime_s is not None:
        result.fits_walltime = result.worker_share_s <= plan.walltime_s
    result.queue_wait_s, result.queue_basis = queue_wait(plan, entries)
    batches = [e["batch"]["mean_batch"] for e in entries if (e.get("batch") or {}).get("mean_batch")]
    result.mean_batch = statistics.median(batches) if batches else None
    return result


def queue_wait(plan: Plan, entries: list[dict[str, Any]]) -> tuple[Optional[float], str]:
    """On a batch system, how long a worker job waited before it started in earlier runs on the
    same partitions: the median of their medians, and what it comes from."""
    if not plan.partitions:
        return None, ""
    waits = [
        (e["queue_wait_s"]["median"], e["queue_wait_s"]["count"])
        for e in entries
        if (e.get("queue_wait_s") or {}).get("count") and tuple(e.get("partitions", ())) == plan.partitions
    ]
    where = ", ".join(plan.partitions)
    if not waits:
        return None, f"no earlier worker job on partition(s) {where}"
    jobs = sum(count for _, count in waits)
    return statistics.median(w for w, _ in waits), f"median of {jobs} job(s) in {len(waits)} run(s) on {where}"


def lines(f: Forecast) -> list[str]:
    """The forecast as the dry run prints it."""
    p = f.plan
    rules = ", ".join(f"{n} of rule {rule}" for rule, n in sorted(p.counts.items()))
    head = f"Sticky forecast, template '{p.template}': {f.invocations} invocation(s) ({rules}) on {p.workers} worker(s)"
    out = [f"{head} x {p.slots} slot(s)" + (f", {p.gpus} GPU(s) each" if p.gpus else "") + "."]
    if f.sticky_s is None or f.setup_s is None or f.create_destroy_s is None:
        return out + [f"  {f.basis}."]
    per_rule = ", ".join(f"{rule} {s:.3f} s" for rule, s in f.rule_s.items())
    out.append(f"  from {f.basis}:")
    out.append(f"  setup {f.setup_s:.1f} s per worker; per invocation: {per_rule}")
    out.append(f"  makespan: sticky {duration(f.sticky_s)}, create-destroy {duration(f.create_destroy_s)}")
    if p.gpus and f.gpu_hours is not None:
        out.append(f"  GPU-hours: {f.gpu_hours:.2f}")
    if f.mean_batch is not None:
        out.append(f"  model calls of {f.mean_batch:.1f} item(s) on average")
    if f.queue_wait_s is not None:
        out.append(f"  a worker job waits {duration(f.queue_wait_s)} in the queue before it starts ({f.queue_basis})")
    elif f.queue_basis:
        out.append(f"  queue wait: unknown ({f.queue_basis}); the makespan starts when the first worker job does")
    if f.fits_walltime is not None and f.worker_share_s is not None and p.walltime_s is not None:
        verdict = "fits" if f.fits_walltime else "does NOT fit"
        share, walltime = duration(f.worker_share_s), duration(p.walltime_s)
        out.append(f"  one worker's share, {share}, {verdict} its job's walltime of {walltime}")
    return out


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s"
