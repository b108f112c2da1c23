"""The run's records: what every worker process and invocation did, kept from the engine's
events as they come, with live log lines about workers and a steady status line. At the end they
become report.json, the timeline and a summary (summary.py, timeline.py).

Workers announce themselves through Dask events (see `worker.py`); invocation timings come back
with each result. The report keeps one record per worker process: a replacement after a loss is
a new record with the same name and the next incarnation number.
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from . import summary
from .invocation import Invocation, InvocationResult
from .templates import TemplateSpec
from .timeline import STICKY_DONE, TimelinePainter, can_draw


@dataclass
class WorkerRecord:
    """What the run knows of one worker process, from its events."""

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
    """One invocation's time on a worker, for the timeline and the statistics."""

    template: str
    worker: Optional[str]
    started: float
    finished: float
    ok: bool
    # the worker's model calls (a Batcher's: start, end, items) reported with this invocation
    calls: tuple[tuple[float, float, int], ...] = ()


@dataclass
class TemplateTally:
    """Counts of a template's workers requested and invocations submitted, done and failed."""

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
        if self.painter is None and can_draw():
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
        """Where timeline.png goes."""
        return self.folder / "timeline.png"

    def invocations_so_far(self) -> list[InvocationRecord]:
        """The invocation records so far (a copy: the painter gets them while the run goes on)."""
        with self._lock:
            return list(self.invocations)

    def dismiss_painter(self) -> None:
        """No timeline this time: let the painter process go."""
        if self.painter is not None:
            self.painter.close()
            self.painter = None

    # -- events ---------------------------------------------------------------------------------

    def workers_requested(self, template: TemplateSpec, count: int) -> None:
        """The engine asked for `count` workers of the template."""
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
                    record.stagings.append(
                        {key: message[key] for key in ("source", "from", "bytes", "seconds", "stage_started")}
                    )
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

    def workers_alive(self, retiring: bool = True) -> dict[str, int]:
        """Workers of each template that have not left (without those retiring already, which
        the log named when they began to retire, unless `retiring`)."""
        with self._lock:
            alive: dict[str, int] = {}
            for worker in self.workers.values():
                gone = worker.gone_at is not None
                if not gone and (retiring or not (worker.retired or worker.template in self._retiring)):
                    alive[worker.template] = alive.get(worker.template, 0) + 1
            return alive

    def invocation_submitted(self, invocation: Invocation) -> None:
        """An invocation was sent to the engine."""
        with self._lock:
            self.tally[invocation.template].submitted += 1

    def invocation_finished(self, invocation: Invocation, outcome: Any) -> None:
        """An invocation's outcome came back: its record, and its worker's counts."""
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
        """report.json's content now (see summary.py)."""
        return summary.report_dict(self, status)

    def write(self, status: str) -> Optional[dict[str, Any]]:
        """Write report.json and timeline.png; log the summary. Returns the report."""
        return summary.write_report(self, status)
