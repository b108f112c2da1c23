"""What the executor tells the user at the start about Snakemake's own flags: a --cores or --jobs
that leaves workers idle, and the large-run flags a run of hundreds of invocations needs."""

from __future__ import annotations

from typing import Optional

# The window that keeps short invocations flowing: this many jobs in flight per invocation slot.
QUEUED_PER_SLOT = 4
# From this many sticky jobs on, Snakemake's default scheduling rounds hold the workers up (480
# invocations of the demo: efficiency 0.65-0.69 with the defaults, 0.80-0.83 with the flags of
# the README's "Large runs").
MANY_STICKY_JOBS = 200


def window_advice(slots: int, cores: Optional[int], jobs: Optional[int]) -> Optional[tuple[str, str]]:
    """(level, message) when --cores (or --jobs, which counts jobs in flight as on any cluster)
    keeps workers idle or lets them wait between invocations; None when it is enough."""
    limit, flag = (jobs, "--jobs") if jobs is not None else (cores, "--cores")
    if limit is None:
        return None
    if slots > limit:
        return "warning", (
            f"Sticky workers offer {slots} invocation slots but {flag} {limit} lets Snakemake "
            f"run at most {limit} jobs at once; raise {flag} to keep every worker busy."
        )
    if limit < QUEUED_PER_SLOT * slots:
        return "info", (
            f"Sticky workers offer {slots} invocation slots and {flag} {limit} lets Snakemake run "
            f"{limit} jobs at once: a worker waits through a Snakemake scheduling round (10-30 ms) "
            f"between invocations. If they are short, {flag} {QUEUED_PER_SLOT * slots} keeps "
            f"invocations queued behind the running ones (docs/further.md, Concurrency)."
        )
    return None


# What measures fastest for a large run (docs/benchmarks.md, "Scale"), and where it comes from.
LARGE_RUN_FLAGS = "--scheduler firstfit --scheduler-subsample 256 --max-jobs-per-timespan 100000/1s --drop-metadata"
FIRSTFIT_PACKAGE = "snakemake-scheduler-plugin-firstfit"
# Below this many job starts per second, Snakemake's rate limit paces a large run.
FAST_START_RATE = 1000


def large_run_advice(
    sticky_jobs: int, scheduler: Optional[str], subsample: Optional[int], starts_per_s: Optional[float], firstfit: bool
) -> Optional[tuple[str, str]]:
    """(level, message) when a run of many sticky jobs uses Snakemake settings that make the
    workers wait for Snakemake: its default ILP scheduler (a problem over every ready job in each
    round), the greedy one (rounds that grow with the square of the ready jobs), firstfit without
    a subsample, or the CLI's limit of 100 job starts a second. None when the settings are fine."""
    if sticky_jobs < MANY_STICKY_JOBS:
        return None
    slow = []
    if scheduler == "ilp":
        slow.append("Snakemake's default ILP scheduler solves a problem over every ready job in each round")
    elif scheduler == "greedy":
        slow.append("the greedy scheduler's rounds grow with the square of the ready jobs")
    elif scheduler == "firstfit" and not subsample:
        slow.append("firstfit without --scheduler-subsample looks at every ready job in each round")
    if starts_per_s is not None and starts_per_s < FAST_START_RATE:
        slow.append(f"--max-jobs-per-timespan lets only {starts_per_s:g} jobs start a second")
    if not slow:
        return None
    text = (
        f"{sticky_jobs} sticky jobs, and {'; '.join(slow)}: the workers wait for Snakemake. For runs this "
        f"large use {LARGE_RUN_FLAGS} (README, 'Large runs'; the profile workflow/profiles/large)."
    )
    if not firstfit:
        text += (
            f" The firstfit scheduler is a plugin of its own: pip install {FIRSTFIT_PACKAGE} (or "
            "'snakemake-executor-plugin-sticky[large]')."
        )
    return ("warning" if scheduler == "greedy" else "info"), text


def firstfit_installed() -> bool:
    """Whether Snakemake can use the firstfit scheduler here."""
    import importlib.util

    return importlib.util.find_spec("snakemake_scheduler_plugin_firstfit") is not None
