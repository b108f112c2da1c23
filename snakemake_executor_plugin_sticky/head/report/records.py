"""The run's records: what every worker process and invocation did, kept from the engine's typed
events (wire.py) as they come, with live log lines about workers and a steady status line.

A pure core: it is fed events and outcomes, and needs no Snakemake, no Dask and no process (its
log is anything with `info` and `warning`). One record per worker process: a replacement after a
loss is a new record with the same name and the next incarnation number.
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional

from ...templates import TemplateSpec
from ...wire import (
    Event,
    Invocation,
    InvocationResult,
    InvocationTimedOut,
    JobStarted,
    Poisoned,
    Preempted,
    Ready,
    Removed,
    SetupFailed,
    SetupStarted,
    Staged,
    WalltimeNear,
    WorkerEvent,
    WorkerExited,
    WorkerWarning,
    template_of,
)


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
    rule: str = ""


@dataclass
class TemplateTally:
    """Counts of a template's workers requested and invocations submitted, done and failed."""

    requested: int = 0
    submitted: int = 0
    tasks: int = 0  # the Dask tasks they were sent in (head/chunking.py)
    done: int = 0
    failed: int = 0


class RunRecords:
    """Collects worker events and invocation outcomes (from several threads) for one run."""

    def __init__(self, templates: dict[str, TemplateSpec], log: Any):
        self.templates = templates
        self.log = log
        self.started = time.time()
        self.workers: dict[str, WorkerRecord] = {}  # by address
        self.invocations: list[InvocationRecord] = []
        self.tally: dict[str, TemplateTally] = {name: TemplateTally() for name in templates}
        self.forecasts: dict[str, Any] = {}  # forecast.Forecast by template, made as the run starts
        self.jobs: dict[str, list[JobStarted]] = {}  # batch jobs whose worker joined, by template
        self.closing = False
        self._incarnations: dict[str, int] = {}
        self._retiring: set[str] = set()  # templates whose workers are being ended on purpose
        self._lock = threading.Lock()
        self._handlers: dict[type, Callable[..., Optional[str]]] = {
            SetupStarted: self._setup_started,
            Ready: self._ready,
            SetupFailed: self._setup_failed,
            Poisoned: self._poisoned,
            Preempted: self._preempted,
            WalltimeNear: self._walltime,
            Staged: self._staged,
            WorkerWarning: self._warning,
            InvocationTimedOut: lambda event, record: None,  # the executor says what it does
        }

    # -- what the executor tells --------------------------------------------------------------

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

    # -- events ---------------------------------------------------------------------------------

    def record(self, event: Event) -> Optional[WorkerRecord]:
        """An engine event, handled by the handler of its type; a line in the log where it says
        something. Returns the worker's record when the event is the loss of a worker."""
        with self._lock:
            if isinstance(event, Removed):
                record, text = self._removed(event)
            elif isinstance(event, WorkerExited):
                record, text = self._exited(event), None
            elif isinstance(event, JobStarted):
                self.jobs.setdefault(event.template, []).append(event)
                record, text = None, None
            else:
                assert isinstance(event, WorkerEvent), event
                record = self._worker_record(event)
                text = self._handlers[type(event)](event, record)
        if text:
            warn = isinstance(event, (Removed, SetupFailed, Poisoned, Preempted, WorkerWarning))
            (self.log.warning if warn else self.log.info)(text)
        return record if isinstance(event, Removed) and record is not None and record.lost else None

    def _removed(self, event: Removed) -> tuple[Optional[WorkerRecord], Optional[str]]:
        record = self.workers.get(event.address) or self._unannounced(event)
        if record is None or record.gone_at is not None:
            return None, None
        record.gone_at = event.time
        record.retired = record.retired or record.template in self._retiring
        record.lost = not (self.closing or record.retired or record.preempted or event.graceful)
        record.retired = not record.lost
        if record.lost:
            return record, (
                f"Sticky worker {record.id} (template '{record.template}') was lost; "
                "its running invocations go to another worker."
            )
        return record, f"Sticky worker {record.id} left after preemption." if record.preempted else None

    def _unannounced(self, event: Removed) -> Optional[WorkerRecord]:
        """A worker of ours removed before its first event reached the run (it died as its setup
        began, a native crash at the template's first line, say): a record of its own, so that
        the loss is logged and counted against the template's budget, as any other. Workers of
        ours are named after their template (wire.worker_name); others (attach mode) are not the
        run's to count."""
        template = template_of(event.name, self.templates)
        if template is None or event.graceful:
            return None
        incarnation = self._incarnations[event.name] = self._incarnations.get(event.name, 0) + 1
        record = WorkerRecord(f"{event.name}#{incarnation}", template, event.name, "", 0, event.address, [])
        self.workers[event.address] = record
        return record

    def _exited(self, event: WorkerExited) -> None:
        record = self.workers.get(event.address)
        if record is not None:
            record.exit = exit_description(event.exitcode)

    def _setup_started(self, event: SetupStarted, record: WorkerRecord) -> str:
        record.setup_started = event.time
        replaced = record.id.split("#")[1] != "1"
        return (
            f"Sticky worker {record.id} (template '{record.template}', pid {record.pid}"
            + (f", GPU {','.join(record.gpus)}" if record.gpus else "")
            + f"){' replaces a lost one and' if replaced else ''} is building its state."
        )

    def _ready(self, event: Ready, record: WorkerRecord) -> str:
        record.setup_started = record.setup_started or event.setup_started
        if record.setup_s is not None:  # rebuilt after poisoning: keep the first setup
            return f"Sticky worker {record.id} rebuilt its state ({event.setup_s:.2f} s)."
        record.setup_finished, record.setup_s = event.time, event.setup_s
        return f"Sticky worker {record.id} is ready (setup {record.setup_s:.2f} s)."

    def _setup_failed(self, event: SetupFailed, record: WorkerRecord) -> str:
        record.setup_started = record.setup_started or event.setup_started
        record.setup_finished, record.error = event.time, event.error
        return f"Sticky worker {record.id}: template '{record.template}' failed to set up."

    def _poisoned(self, event: Poisoned, record: WorkerRecord) -> str:
        record.rebuilds += 1
        return f"Sticky worker {record.id}: {event.cause} poisoned its state; rebuilding it."

    def _preempted(self, event: Preempted, record: WorkerRecord) -> str:
        record.preempted = True
        return (
            f"Sticky worker {record.id} got SIGTERM (preempted): it takes no new invocations, "
            f"lets running ones finish within {event.grace_s:g} s, then leaves."
        )

    def _walltime(self, event: WalltimeNear, record: WorkerRecord) -> str:
        record.retired = True
        return (
            f"Sticky worker {record.id} nears its walltime: it takes no new invocations, "
            f"lets running ones finish within {event.grace_s:g} s, then leaves."
        )

    def _staged(self, event: Staged, record: WorkerRecord) -> str:
        record.stagings.append(
            {
                "source": event.source,
                "from": event.origin,
                "bytes": event.bytes,
                "seconds": event.seconds,
                "copy_seconds": event.copy_seconds,
                "stage_started": event.stage_started,
            }
        )
        return (
            f"Sticky worker {record.id} staged {event.source} ({event.bytes / 1e6:.1f} MB) "
            f"from {event.origin} in {event.seconds:.2f} s"
            + (f" (the copy {event.copy_seconds:.2f} s)." if event.origin != "cache" else ".")
        )

    def _warning(self, event: WorkerWarning, record: WorkerRecord) -> str:
        return f"Sticky worker {record.id} (pid {record.pid}): {event.text}"

    def _worker_record(self, event: WorkerEvent) -> WorkerRecord:
        record = self.workers.get(event.address)
        if record is None:
            incarnation = self._incarnations.get(event.name, 0) + 1
            self._incarnations[event.name] = incarnation
            record = WorkerRecord(
                id=f"{event.name}#{incarnation}",
                template=event.template,
                name=event.name,
                host=event.host,
                pid=event.pid,
                address=event.address,
                gpus=list(event.gpus),
            )
            self.workers[event.address] = record
        return record

    def describe_worker(self, address: str) -> str:
        """A worker as the log names it, with how it ended where known."""
        with self._lock:
            record = self.workers.get(address)
        if record is None:
            return f"worker {address}"
        pid = f", pid {record.pid}" if record.pid else ""  # 0: it died before it said
        return f"worker {record.id}{pid}" + (f", {record.exit}" if record.exit else "")

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

    def tasks_sent(self, template: str, count: int) -> None:
        """The template's invocations of a pass went to the engine in `count` Dask tasks."""
        with self._lock:
            self.tally[template].tasks += count

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
                    invocation.rule,
                )
            )

    def snapshot(self, closing_at: Optional[float] = None) -> tuple[list[WorkerRecord], list[InvocationRecord]]:
        """Copies of the records for report.json and the timeline; workers still alive when the run
        closes (at `closing_at`) count as retired then."""
        with self._lock:
            if self.closing and closing_at is not None:
                for worker in self.workers.values():
                    if worker.gone_at is None:
                        worker.gone_at, worker.retired = closing_at, True
            return [replace(w, stagings=list(w.stagings)) for w in self.workers.values()], list(self.invocations)

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
