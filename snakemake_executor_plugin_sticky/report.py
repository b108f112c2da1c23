"""Report room: where the time went. Live log lines about workers, a steady status line,
`.snakemake/sticky/report.json`, `.snakemake/sticky/timeline.png` and an end-of-run summary.

Workers announce themselves through Dask events (see `worker.py`); invocation timings come back
with each result. The report keeps one record per worker process: a replacement after a loss is
a new record with the same name and the next incarnation number.
"""

from __future__ import annotations

import json
import re
import signal
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from . import forkserver
from .invocation import Invocation, InvocationResult
from .templates import TemplateSpec

REPORT_VERSION = 1
PAINT_TIMEOUT_S = 120.0
# The timeline's status when it is drawn before the run ends (see RunReport.sticky_jobs_done).
STICKY_DONE = "all sticky jobs done"


@dataclass
class WorkerRecord:
    id: str
    template: str
    name: str
    host: str
    pid: int
    address: str
    gpus: list[str]
    setup_started: Optional[float] = None
    setup_finished: Optional[float] = None
    setup_s: Optional[float] = None
    error: Optional[str] = None
    invocations: int = 0
    busy_s: float = 0.0
    lost: bool = False
    retired: bool = False
    preempted: bool = False
    rebuilds: int = 0
    gone_at: Optional[float] = None
    exit: Optional[str] = None  # how its process ended, where known ("killed by signal 11 (SIGSEGV)")
    # stage() copies made or found in its setup: source, from (cache, shared, peer ...), bytes, seconds
    stagings: list[dict[str, Any]] = field(default_factory=list)


def exit_description(exitcode: int) -> str:
    """A process's exit as multiprocessing reports it: a negative code is the killing signal."""
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = "unknown"
        return f"killed by signal {-exitcode} ({name})"
    return f"exited with status {exitcode}"


@dataclass
class InvocationRecord:
    template: str
    worker: Optional[str]
    started: float
    finished: float
    ok: bool
    # the worker's model calls (a Batcher's: start, end, items) reported with this invocation
    calls: tuple[tuple[float, float, int], ...] = ()


@dataclass
class TemplateTally:
    requested: int = 0
    submitted: int = 0
    done: int = 0
    failed: int = 0


class RunReport:
    """Collects worker events and invocation outcomes (from several threads) for one run."""

    def __init__(self, templates: dict[str, TemplateSpec], folder: Path, log: Any):
        self.templates = templates
        self.folder = folder
        self.log = log
        self.started = time.time()
        self.workers: dict[str, WorkerRecord] = {}  # by address
        self.invocations: list[InvocationRecord] = []
        self.tally: dict[str, TemplateTally] = {name: TemplateTally() for name in templates}
        self.closing = False
        self.painter: Optional[TimelinePainter] = None  # see start_painter
        self._incarnations: dict[str, int] = {}
        self._retiring: set[str] = set()  # templates whose workers are being ended on purpose
        self._lock = threading.Lock()

    def start_painter(self) -> None:
        """Get timeline.png's painter going: once workers start, a report will be written."""
        if self.painter is not None and self.painter.drawing:
            self.dismiss_painter()  # drawn too early: workers start again after all
        if self.painter is None:
            self.painter = TimelinePainter()

    def sticky_jobs_done(self) -> None:
        """Every sticky job of the run is done: the painter draws timeline.png now, while the
        jobs after them run, rather than after the last one."""
        if self.painter is None or self.painter.drawing:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        self.painter.start_drawing(self.as_dict(STICKY_DONE), self.invocations_so_far(), self.started, self.timeline)

    @property
    def timeline(self) -> Path:
        return self.folder / "timeline.png"

    def invocations_so_far(self) -> list[InvocationRecord]:
        with self._lock:
            return list(self.invocations)

    def dismiss_painter(self) -> None:
        if self.painter is not None:
            self.painter.close()
            self.painter = None

    # -- events ---------------------------------------------------------------------------------

    def workers_requested(self, template: TemplateSpec, count: int) -> None:
        with self._lock:
            self.tally[template.name].requested += count
            self._retiring.discard(template.name)

    def expect_removal(self, address: str) -> None:
        """The engine is about to replace this worker on purpose: its removal is no loss."""
        with self._lock:
            if address in self.workers:
                self.workers[address].retired = True

    def retiring(self, template: str) -> None:
        """The template's workers are being ended on purpose: their removals are no loss (also
        of those whose first event is still on its way)."""
        with self._lock:
            self._retiring.add(template)
            for worker in self.workers.values():
                if worker.template == template and worker.gone_at is None:
                    worker.retired = True

    def worker_event(self, message: dict[str, Any]) -> Optional[WorkerRecord]:
        """A worker-side event (setup-start, ready, setup-failed, poisoned, preempted) or a
        removal seen by the scheduler. Returns the worker's record when it was lost."""
        kind = message.get("event")
        with self._lock:
            if kind == "removed":
                record = self.workers.get(message["address"])
                if record is None or record.gone_at is not None:
                    return None
                record.gone_at = message["time"]
                record.retired = record.retired or record.template in self._retiring
                record.lost = not (self.closing or record.retired or record.preempted or message.get("graceful"))
                record.retired = not record.lost
                text = (
                    f"Sticky worker {record.id} (template '{record.template}') was lost; "
                    "its running invocations go to another worker."
                    if record.lost
                    else (f"Sticky worker {record.id} left after preemption." if record.preempted else None)
                )
            elif kind == "invocation-timeout":
                return None
            elif kind == "worker-exit":
                record = self.workers.get(message["address"])
                if record is not None:
                    record.exit = exit_description(message["exitcode"])
                return None
            else:
                record = self._worker_record(message)
                record.setup_started = record.setup_started or message.get("setup_started")
                if kind == "setup-start":
                    record.setup_started = message["time"]
                    replaced = record.id.split("#")[1] != "1"
                    text = (
                        f"Sticky worker {record.id} (template '{record.template}', pid {record.pid}"
                        + (f", GPU {','.join(record.gpus)}" if record.gpus else "")
                        + f"){' replaces a lost one and' if replaced else ''} is building its state."
                    )
                elif kind == "ready":
                    if record.setup_s is not None:  # rebuilt after poisoning: keep the first setup
                        text = f"Sticky worker {record.id} rebuilt its state ({message['setup_s']:.2f} s)."
                    else:
                        record.setup_finished = message["time"]
                        record.setup_s = message["setup_s"]
                        text = f"Sticky worker {record.id} is ready (setup {record.setup_s:.2f} s)."
                elif kind == "poisoned":
                    record.rebuilds += 1
                    text = f"Sticky worker {record.id}: {message['cause']} poisoned its state; rebuilding it."
                elif kind == "preempted":
                    record.preempted = True
                    text = (
                        f"Sticky worker {record.id} got SIGTERM (preempted): it takes no new invocations, "
                        f"lets running ones finish within {message['grace_s']:g} s, then leaves."
                    )
                elif kind == "walltime":
                    record.retired = True
                    text = (
                        f"Sticky worker {record.id} nears its walltime: it takes no new invocations, "
                        f"lets running ones finish within {message['grace_s']:g} s, then leaves."
                    )
                elif kind == "setup-failed":
                    record.setup_finished = message["time"]
                    record.error = message["error"]
                    text = f"Sticky worker {record.id}: template '{record.template}' failed to set up."
                elif kind == "staged":
                    record.stagings.append({key: message[key] for key in ("source", "from", "bytes", "seconds", "stage_started")})
                    text = (
                        f"Sticky worker {record.id} staged {message['source']} ({message['bytes'] / 1e6:.1f} MB) "
                        f"from {message['from']} in {message['seconds']:.2f} s."
                    )
                elif kind == "warning":
                    text = f"Sticky worker {record.id} (pid {record.pid}): {message['text']}"
                else:
                    return
        if text:
            warn = kind in ("removed", "setup-failed", "poisoned", "preempted", "warning")
            (self.log.warning if warn else self.log.info)(text)
        return record if kind == "removed" and record.lost else None

    def describe_worker(self, address: str) -> str:
        """A worker as the log names it, with how it ended where known."""
        with self._lock:
            record = self.workers.get(address)
        if record is None:
            return f"worker {address}"
        return f"worker {record.id}, pid {record.pid}" + (f", {record.exit}" if record.exit else "")

    def _worker_record(self, message: dict[str, Any]) -> WorkerRecord:
        address = message["address"]
        record = self.workers.get(address)
        if record is None:
            incarnation = self._incarnations.get(message["name"], 0) + 1
            self._incarnations[message["name"]] = incarnation
            record = WorkerRecord(
                id=f"{message['name']}#{incarnation}",
                template=message["template"],
                name=message["name"],
                host=message["host"],
                pid=message["pid"],
                address=address,
                gpus=list(message.get("gpus") or []),
            )
            self.workers[address] = record
        return record

    def workers_alive(self) -> dict[str, int]:
        with self._lock:
            alive: dict[str, int] = {}
            for worker in self.workers.values():
                if worker.gone_at is None:
                    alive[worker.template] = alive.get(worker.template, 0) + 1
            return alive

    def invocation_submitted(self, invocation: Invocation) -> None:
        with self._lock:
            self.tally[invocation.template].submitted += 1

    def invocation_finished(self, invocation: Invocation, outcome: Any) -> None:
        with self._lock:
            tally = self.tally[invocation.template]
            tally.done += 1
            if not isinstance(outcome, InvocationResult):
                tally.failed += 1
                return
            tally.failed += not outcome.ok
            worker = self.workers.get(outcome.address)
            if worker is not None:
                worker.invocations += 1
                worker.busy_s += outcome.finished - outcome.started
            self.invocations.append(
                InvocationRecord(
                    invocation.template,
                    worker.id if worker else None,
                    outcome.started,
                    outcome.finished,
                    outcome.ok,
                    tuple(tuple(call) for call in outcome.extra.get("model_calls", ())),
                )
            )

    # -- live status ----------------------------------------------------------------------------

    def status_line(self) -> Optional[str]:
        """One compact line per run state, or None when nothing is going on."""
        parts = []
        with self._lock:
            for name, tally in self.tally.items():
                if not tally.requested:
                    continue
                alive = [w for w in self.workers.values() if w.template == name and w.gone_at is None]
                ready = sum(w.setup_s is not None for w in alive)
                broken = sum(w.error is not None for w in alive)
                starting = max(0, tally.requested - ready - broken)
                in_flight = tally.submitted - tally.done
                running = min(in_flight, ready * self.templates[name].slots)
                parts.append(
                    f"{name}: workers {starting} starting / {ready} ready"
                    + (f" / {broken} broken" if broken else "")
                    + ", invocations "
                    f"{running} running / {in_flight - running} waiting / {tally.done} done"
                    + (f" ({tally.failed} failed)" if tally.failed else "")
                )
        return "sticky status | " + " | ".join(parts) if parts else None

    # -- end of run -----------------------------------------------------------------------------

    def as_dict(self, status: str) -> dict[str, Any]:
        finished = time.time()
        templates = {}
        with self._lock:
            if self.closing:
                for worker in self.workers.values():
                    if worker.gone_at is None:
                        worker.gone_at, worker.retired = finished, True
            for name, spec in self.templates.items():
                tally = self.tally[name]
                if not tally.requested and not tally.submitted:
                    continue
                workers = [w for w in self.workers.values() if w.template == name]
                durations = [i.finished - i.started for i in self.invocations if i.template == name]
                setups = [w.setup_s for w in workers if w.setup_s is not None]
                median_setup = statistics.median(setups) if setups else None
                served = len(durations)
                templates[name] = {
                    "identity": spec.identity,
                    "setup_file": str(spec.setup),
                    "gpus_per_worker": spec.gpus,
                    "slots": spec.slots,
                    "workers": [self._worker_dict(w) for w in workers],
                    "workers_lost": sum(w.lost for w in workers),
                    "state_builds": len(setups) + sum(w.rebuilds for w in workers),
                    "rebuilds": max(0, len(setups) - tally.requested) + sum(w.rebuilds for w in workers),
                    "invocations": served,
                    "failed_invocations": tally.failed,
                    "invocation_s": distribution(durations),
                    "setup_s": distribution(setups),
                    "setup_s_total": round(sum(setups), 3),
                    "setup_amortized_s_per_invocation": round(sum(setups) / served, 4) if served else None,
                    "create_destroy_setup_s": round(served * median_setup, 3) if median_setup is not None else None,
                    "estimated_saved_s": round(served * median_setup - sum(setups), 3) if median_setup is not None else None,
                    "model_calls": model_calls([c for i in self.invocations if i.template == name for c in i.calls]),
                }
        return {
            "version": REPORT_VERSION,
            "status": status,
            "started": self.started,
            "finished": finished,
            "wall_s": round(finished - self.started, 3),
            "templates": templates,
        }

    def _worker_dict(self, worker: WorkerRecord) -> dict[str, Any]:
        data = asdict(worker)
        for key in ("setup_started", "setup_finished", "gone_at"):
            if data[key] is not None:
                data[key] = round(data[key] - self.started, 3)  # seconds since the run started
        data["busy_s"] = round(worker.busy_s, 3)
        for staging in data["stagings"]:
            staging["stage_started"] = round(staging["stage_started"] - self.started, 3)
        return data

    def summary_lines(self, report: dict[str, Any]) -> list[str]:
        lines = []
        for name, t in report["templates"].items():
            median = t["setup_s"]["median"] if t["setup_s"] else None
            lines.append(
                f"Sticky template '{name}': {len(t['workers'])} worker(s), median setup "
                + (f"{median:.2f} s" if median is not None else "n/a")
                + f", {t['invocations']} invocation(s)"
                + (f", setup amortized {t['setup_amortized_s_per_invocation']:.3f} s/invocation" if t["setup_amortized_s_per_invocation"] is not None else "")
                + (f", ~{t['estimated_saved_s']:.1f} s of setup saved vs create-destroy" if t["estimated_saved_s"] is not None else "")
                + "."
            )
        return lines

    def write(self, status: str) -> Optional[dict[str, Any]]:
        """Write report.json and timeline.png; log the summary. Returns the report."""
        report = self.as_dict(status)
        if not report["templates"]:
            self.dismiss_painter()
            return None
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        invocations = self.invocations_so_far()
        painter, self.painter = self.painter, None
        try:
            if painter is not None:
                if not painter.drawing:
                    painter.start_drawing(report, invocations, self.started, self.timeline)
                painter.finish_drawing()
            else:
                draw_timeline(report, invocations, self.started, self.timeline)
        except Exception as e:  # the picture must not cost the run its report
            self.log.warning(f"Sticky report: could not draw timeline.png: {type(e).__name__}: {e}")
        for line in self.summary_lines(report):
            self.log.info(line)
        self.log.info(f"Sticky report: {self.folder / 'report.json'}, timeline: {self.timeline}")
        return report


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


def natural(text: str) -> list[Any]:
    """Sort key that puts llm-2 before llm-10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


class TimelinePainter:
    """Draws timeline.png in a process of its own, started with the workers. It loads matplotlib
    (about 0.5 s of CPU) at the lowest CPU priority, on cycles the workers leave idle, instead of
    in this process after the last invocation, where every second adds to the makespan. Forked
    from the workers' forkserver where there is one (cheap, no CUDA, no copy of this process)."""

    def __init__(self) -> None:
        import multiprocessing

        if forkserver.available():
            forkserver.start_forkserver()  # running already, unless the workers are batch jobs
            context = multiprocessing.get_context("forkserver")
        else:
            context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=paint_when_asked, args=(child,), name="sticky-timeline", daemon=True)
        self._process.start()
        child.close()
        self.drawing = False

    def start_drawing(
        self, report: dict[str, Any], invocations: list["InvocationRecord"], origin: float, path: Path
    ) -> None:
        """Hand the run over; the picture comes with `finish_drawing`."""
        self.drawing = True
        try:
            self._conn.send((report, invocations, origin, path))
        except OSError:
            pass  # the painter is gone: finish_drawing says so

    def finish_drawing(self) -> None:
        """Wait for the picture; the painter exits after it."""
        try:
            if not self._conn.poll(PAINT_TIMEOUT_S):
                raise TimeoutError(f"the painter process took more than {PAINT_TIMEOUT_S:.0f} s")
            error = self._conn.recv()
        finally:
            self.close()
        if error is not None:
            raise RuntimeError(error)

    def close(self) -> None:
        """Dismiss the painter (it exits when its pipe closes) and reap it."""
        self._conn.close()
        self._process.join(timeout=5)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()


def paint_when_asked(conn: Any) -> None:
    """The painter process: load matplotlib now, draw one timeline when asked (once every sticky
    job is done, or when the run is over)."""
    import os
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for Snakemake, which then asks for the picture
    os.nice(19)
    try:
        _import_pyplot()
    except Exception:
        pass  # drawing below fails with the cause, which goes back to the Snakemake process
    try:
        report, invocations, origin, path = conn.recv()
    except (EOFError, OSError):
        return  # dismissed: no report this run
    try:
        draw_timeline(report, invocations, origin, path)
        conn.send(None)
    except Exception as e:
        conn.send(f"{type(e).__name__}: {e}")


def _import_pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw_timeline(report: dict[str, Any], invocations: list[InvocationRecord], origin: float, path: Path) -> None:
    """One row per worker: setup (hatched) and invocations as bars coloured by template."""
    plt = _import_pyplot()
    from matplotlib.patches import Patch

    order = {name: i for i, name in enumerate(report["templates"])}
    rows = [w for t in report["templates"].values() for w in t["workers"]]
    rows.sort(key=lambda w: (order[w["template"]], natural(w["id"])))
    palette = plt.get_cmap("tab10")
    colors = {name: palette(i % 10) for i, name in enumerate(report["templates"])}
    index = {w["id"]: i for i, w in enumerate(rows)}
    height = min(max(2.8, 0.26 * len(rows) + 1.6), 40)
    fig, ax = plt.subplots(figsize=(11, height))
    bars: dict[int, list[tuple[float, float]]] = {}
    failed: dict[int, list[tuple[float, float]]] = {}
    calls: dict[int, list[tuple[float, float]]] = {}
    for inv in invocations:
        if inv.worker in index:
            (bars if inv.ok else failed).setdefault(index[inv.worker], []).append(
                (inv.started - origin, inv.finished - inv.started)
            )
            calls.setdefault(index[inv.worker], []).extend((start - origin, end - start) for start, end, _ in inv.calls)
    for i, worker in enumerate(rows):
        color = colors[worker["template"]]
        if worker["setup_started"] is not None:
            end = worker["setup_finished"] if worker["setup_finished"] is not None else report["wall_s"]
            ax.broken_barh([(worker["setup_started"], end - worker["setup_started"])], (i - 0.4, 0.8),
                           facecolors="white", edgecolors=color, hatch="////", linewidth=0.8)
        for staging in worker.get("stagings", ()):
            ax.broken_barh([(staging["stage_started"], staging["seconds"])], (i - 0.4, 0.8),
                           facecolors="whitesmoke", edgecolors="grey", hatch="....", linewidth=0.8)
        thin = 0.3 if len(invocations) < 2000 else 0
        ax.broken_barh(bars.get(i, []), (i - 0.35, 0.7), facecolors=color, edgecolors="white", linewidth=thin)
        ax.broken_barh(failed.get(i, []), (i - 0.35, 0.7), facecolors="black")
        ax.broken_barh(calls.get(i, []), (i - 0.48, 0.12), facecolors="dimgrey")  # model calls
        if worker["lost"]:
            ax.plot([worker["gone_at"]], [i], marker="X", color="red", markersize=9, zorder=5)
    step = max(1, len(rows) // 60)
    labels = [rows[i]["id"] for i in range(0, len(rows), step)]
    label_size = 8 if len(rows) < 30 else 6
    ax.set_yticks(range(0, len(rows), step))
    ax.set_yticklabels(labels, fontsize=label_size)
    ax.set_ylim(-0.7, len(rows) - 0.3)
    ax.invert_yaxis()
    ax.set_xlim(0, max(report["wall_s"], 1e-3))
    ax.set_xlabel("seconds since the run started")
    state = report["status"] if report["status"] == STICKY_DONE else f"run {report['status']}"
    handles = [Patch(facecolor=c, label=f"invocations of '{n}'") for n, c in colors.items()]
    handles += [Patch(facecolor="white", edgecolor="grey", hatch="////", label="setup")]
    if any(w.get("stagings") for w in rows):
        handles.append(Patch(facecolor="whitesmoke", edgecolor="grey", hatch="....", label="staging (in setup)"))
    if failed:
        handles.append(Patch(facecolor="black", label="failed invocation"))
    if calls:
        handles.append(Patch(facecolor="dimgrey", label="model call (Batcher)"))
    if any(w["lost"] for w in rows):
        handles.append(plt.Line2D([], [], marker="X", color="red", linestyle="", label="worker lost"))
    # The legend in rows of 4 between the title and the plot, so long template names overlap nothing.
    columns = min(len(handles), 4)
    legend_rows = -(-len(handles) // columns)
    ax.legend(handles=handles, loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=columns, fontsize=8,
              frameon=False, borderaxespad=0.2)
    ax.set_title(f"Sticky workers: state setup and invocations ({state})", loc="left", fontsize=10,
                 pad=6 + 13 * legend_rows)
    ax.grid(axis="x", alpha=0.3)
    # Margins from the label lengths: tight_layout measures every text by drawing the figure
    # once more, a third of the drawing time, which the run's exit waits for.
    label_width = max((len(label) for label in labels), default=0) * label_size * 0.62 / 72 + 0.25
    width, height = fig.get_size_inches()
    top = 0.3 + 0.19 * legend_rows
    fig.subplots_adjust(left=label_width / width, right=1 - 0.2 / width, bottom=0.6 / height, top=1 - top / height)
    fig.savefig(path, dpi=110)
    plt.close(fig)
