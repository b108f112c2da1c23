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


def large_run_advice(sticky_jobs: int, scheduler: Optional[str]) -> Optional[str]:
    """Snakemake's default ILP scheduler solves a problem over every ready job in each round
    (25-80 ms with hundreds of them), and a worker waits while it does."""
    if sticky_jobs < MANY_STICKY_JOBS or scheduler != "ilp":
        return None
    return (
        f"{sticky_jobs} sticky jobs under Snakemake's default ILP scheduler, which solves a problem "
        f"over all ready jobs in every round while the workers wait. For runs this large, use "
        f"the flags of the README's 'Large runs': --scheduler greedy (or firstfit), "
        f"--max-jobs-per-timespan 100000/1s, --cores about 16 x workers x slots."
    )
