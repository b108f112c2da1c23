"""The end of a run: `.snakemake/sticky/report.json` and a summary line per template for the log,
from a snapshot of the run's records (records.py)."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict
from typing import Any, Optional

from ..forecast import Forecast
from ..history import rule_times
from .records import RunRecords, WorkerRecord

REPORT_VERSION = 1


def report_dict(records: RunRecords, status: str) -> dict[str, Any]:
    """report.json's content: per template, its workers, invocations, setups and model calls."""
    finished = time.time()
    all_workers, invocations = records.snapshot(closing_at=finished)
    templates = {}
    for name, spec in records.templates.items():
        tally = records.tally[name]
        if not tally.requested and not tally.submitted:
            continue
        workers = [w for w in all_workers if w.template == name]
        own = [i for i in invocations if i.template == name]
        durations = [i.finished - i.started for i in own]
        by_rule: dict[str, list[float]] = {}
        for i in own:
            by_rule.setdefault(i.rule, []).append(i.finished - i.started)
        starts = [w.setup_started for w in workers if w.setup_started is not None]
        span = max(i.finished for i in own) - min(starts) if own and starts else None
        setups = [w.setup_s for w in workers if w.setup_s is not None]
        median_setup = statistics.median(setups) if setups else None
        served = len(durations)
        templates[name] = {
            "identity": spec.identity,
            "setup_file": str(spec.setup),
            "gpus_per_worker": spec.gpus,
            "slots": spec.slots,
            "workers": [worker_dict(w, records.started) for w in workers],
            "workers_lost": sum(w.lost for w in workers),
            "state_builds": len(setups) + sum(w.rebuilds for w in workers),
            "rebuilds": max(0, len(setups) - tally.requested) + sum(w.rebuilds for w in workers),
            "invocations": served,
            "failed_invocations": tally.failed,
            "dask_tasks": tally.tasks,
            "invocation_s": distribution(durations),
            "setup_s": distribution(setups),
            "setup_s_total": round(sum(setups), 3),
            "setup_amortized_s_per_invocation": round(sum(setups) / served, 4) if served else None,
            "create_destroy_setup_s": round(served * median_setup, 3) if median_setup is not None else None,
            "estimated_saved_s": round(served * median_setup - sum(setups), 3) if median_setup is not None else None,
            "model_calls": model_calls([c for i in invocations if i.template == name for c in i.calls]),
            "queue_wait_s": distribution([j.queued_s for j in records.jobs.get(name, [])]),
            "partitions": sorted({j.partition for j in records.jobs.get(name, [])}),
            "rules": rule_times(by_rule),
            "sticky_s": round(span, 3) if span is not None else None,
        }
        if name in records.forecasts:
            templates[name]["forecast"] = beside(records.forecasts[name], span)
    return {
        "version": REPORT_VERSION,
        "status": status,
        "started": records.started,
        "finished": finished,
        "wall_s": round(finished - records.started, 3),
        "templates": templates,
    }


def beside(forecast: Forecast, span: Optional[float]) -> dict[str, Any]:
    """The forecast made before the run, beside what happened: its makespan's error."""
    predicted = forecast.sticky_s
    error = (span - predicted) / predicted if predicted and span is not None else None
    return {
        "basis": forecast.basis,
        "runs": forecast.runs,
        "setup_s": forecast.setup_s,
        "rule_s": forecast.rule_s,
        "sticky_s": predicted,
        "create_destroy_s": forecast.create_destroy_s,
        "gpu_hours": forecast.gpu_hours,
        "fits_walltime": forecast.fits_walltime,
        "measured_sticky_s": round(span, 3) if span is not None else None,
        "error": round(error, 4) if error is not None else None,
    }


def worker_dict(worker: WorkerRecord, started: float) -> dict[str, Any]:
    """A worker's record for report.json, with times counted from the start of the run."""
    data = asdict(worker)
    for key in ("setup_started", "setup_finished", "gone_at"):
        if data[key] is not None:
            data[key] = round(data[key] - started, 3)  # seconds since the run started
    data["busy_s"] = round(worker.busy_s, 3)
    for staging in data["stagings"]:
        staging["stage_started"] = round(staging["stage_started"] - started, 3)
    return data


def summary_lines(report: dict[str, Any]) -> list[str]:
    """One line per template for the end of the log."""
    lines = []
    for name, t in report["templates"].items():
        median = t["setup_s"]["median"] if t["setup_s"] else None
        lines.append(
            f"Sticky template '{name}': {len(t['workers'])} worker(s), median setup "
            + (f"{median:.2f} s" if median is not None else "n/a")
            + f", {t['invocations']} invocation(s)"
            + (
                f", setup amortized {t['setup_amortized_s_per_invocation']:.3f} s/invocation"
                if t["setup_amortized_s_per_invocation"] is not None
                else ""
            )
            + (
                f", ~{t['estimated_saved_s']:.1f} s of setup saved vs create-destroy"
                if (t["estimated_saved_s"] or 0) >= 0.05  # nothing saved (a run cut short): nothing said
                else ""
            )
            + "."
        )
    return lines


def model_calls(calls: list[tuple[float, float, int]]) -> Optional[dict[str, Any]]:
    """The template's model calls through a Batcher: how many, their batch sizes, the device's busy time."""
    if not calls:
        return None
    sizes = [items for _, _, items in calls]
    return {
        "calls": len(calls),
        "items": sum(sizes),
        "mean_batch": round(statistics.fmean(sizes), 2),
        "max_batch": max(sizes),
        "device_busy_s": round(sum(end - start for start, end, _ in calls), 3),
    }


def distribution(values: list[float]) -> Optional[dict[str, float]]:
    """Count, min, median, mean, 90th percentile, max and total of some durations."""
    if not values:
        return None
    ordered = sorted(values)
    return {
        "count": len(ordered),
        "min": round(ordered[0], 4),
        "median": round(statistics.median(ordered), 4),
        "mean": round(statistics.fmean(ordered), 4),
        "p90": round(ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], 4),
        "max": round(ordered[-1], 4),
        "total": round(sum(ordered), 4),
    }
