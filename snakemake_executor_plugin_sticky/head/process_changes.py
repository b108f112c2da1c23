"""Process-wide changes: every change a run makes to the Snakemake process beyond its own
objects, in one place, each undone when the run ends (a process that runs more workflows through
Snakemake's API gets its state back).

- Python's full garbage collections of the objects Snakemake built before the run (the workflow,
  the DAG): one mid-run is a stall of every thread here, the Dask scheduler's included
  (docs/benchmarks.md, "Start-up costs"). They are frozen out of collections while the run lasts.
- Dask's config values the engine needs, and the level of Dask's loggers (its INFO chatter is
  noise in a Snakemake log).
- multiprocessing's spawn preparation, so that spawned children skip re-importing the snakemake
  CLI (see forkserver.py).
- Snakemake's scheduler: its wakeups are coalesced, and a job's check for pipe inputs is skipped
  where no rule has a pipe (both cost more than a no-op invocation in a large run).
"""

from __future__ import annotations

import asyncio
import atexit
import gc
import logging
import sys
import threading
import time
from functools import partial
from typing import Any, Callable, Optional


class ProcessChanges:
    """The changes of one run, and their undoing (in reverse order)."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], Any]] = []

    def freeze_collections(self) -> None:
        """Freeze the objects Snakemake made before the run out of garbage collections."""
        gc.freeze()
        self._undo.append(gc.unfreeze)
        if snakemake_cli_process():
            # At interpreter exit the objects are frozen again, which skips the last collection:
            # a stall after the run is over. Files, workers and logs are closed before then.
            atexit.unregister(gc.freeze)
            atexit.register(gc.freeze)

    def dask_config(self, values: dict[str, Any]) -> None:
        """Set Dask config values for the run."""
        import dask

        before = {key: dask.config.get(key, default=None) for key in values}
        dask.config.set(values)
        self._undo.append(lambda: dask.config.set(before))

    def logger_level(self, name: str, level: int) -> None:
        """Set a logger's level for the run."""
        logger = logging.getLogger(name)
        before = logger.level
        logger.setLevel(level)
        self._undo.append(lambda: logger.setLevel(before))

    def quiet_closing_noise(self) -> threading.Event:
        """The scheduler's close cuts the connection of a worker it removed but that has not hung
        up yet (a worker on another host, or one given up), which Dask logs as an error with a
        traceback of a CancelledError and is none. Once the returned event is set (the run
        closes), that is kept out of the log; every other failure, a failed TLS handshake
        included, is still said."""
        closing = threading.Event()

        def keep_stream(record: logging.LogRecord) -> bool:
            kind = record.exc_info[0] if record.exc_info else None
            cut = kind is not None and issubclass(kind, asyncio.CancelledError)
            return not (closing.is_set() and cut)

        logger = logging.getLogger("distributed.scheduler")
        logger.addFilter(keep_stream)
        self._undo.append(partial(logger.removeFilter, keep_stream))
        return closing

    def coalesce_wakeups(self, scheduler: Any) -> None:
        """Snakemake's scheduler runs a pass of its loop for every release of a counting
        semaphore, and every pass looks at all ready jobs: a pass per invocation costs more than
        the invocation. Two kinds of release are coalesced, without losing a pass that has work:
        - a job reported finished wakes the loop only when it is the first since the last pass
          took them (a pass handles every job reported before it);
        - with a job rate limit (the CLI always sets one) every pass starts a timer that releases
          the semaphore a timespan later, so every pass echoes once a timespan until the run
          ends: hundreds of idle passes a second in a long run. One timer waits at a time; its
          pass starts the next, so the loop still looks again within a timespan."""
        original = scheduler.finish_callback
        if getattr(original, "__func__", None) is not type(scheduler)._proceed or scheduler.dryrun:
            return  # another executor's callbacks (--immediate-submit), or a dry run: left as they are

        def proceed(job: Any) -> None:
            with scheduler._lock:
                scheduler._tofinish.append(job)
                first = len(scheduler._tofinish) == 1
            if first:
                scheduler._open_jobs.release()

        scheduler.finish_callback = proceed
        self._undo.append(partial(setattr, scheduler, "finish_callback", original))
        scheduler._schedule_reevalutation = ReevaluationTimer(scheduler._open_jobs).schedule
        self._undo.append(partial(delattr, scheduler, "_schedule_reevalutation"))

    def skip_pipe_lookups(self, rules: Any) -> None:
        """Snakemake's `Job.prepare` asks, for each input of a job, whether a pipe or a service
        feeds it, by walking all of the job's dependencies: quadratic in a job that gathers the
        outputs of N invocations (a `rule all`), which the local executor prepares in Snakemake's
        scheduler thread. Where no rule of the workflow has a pipe or service output, no job has
        one, and the answer is no for every input: it is given without the walk."""
        from snakemake.io import is_flagged
        from snakemake.jobs import Job

        if any(is_flagged(f, "pipe") or is_flagged(f, "service") for rule in rules for f in rule.output):
            return
        original = Job.__dict__["is_pipe_or_service_input"]
        Job.is_pipe_or_service_input = no_pipe_or_service_input  # type: ignore[method-assign]
        self._undo.append(partial(setattr, Job, "is_pipe_or_service_input", original))

    def on_undo(self, undo: Callable[[], Any]) -> None:
        """Undo this, too, when the run ends."""
        self._undo.append(undo)

    def undo(self) -> None:
        """Put everything back, last change first."""
        while self._undo:
            self._undo.pop()()


def no_pipe_or_service_input(job: Any, path: Any) -> bool:
    """`Job.is_pipe_or_service_input` in a workflow without pipes or services."""
    return False


def snakemake_cli_process() -> bool:
    """Whether this process runs Snakemake's command line (and ends with the run)."""
    main = sys.modules.get("__main__")
    return getattr(getattr(main, "main", None), "__module__", "") == "snakemake.cli"


class ReevaluationTimer:
    """Releases Snakemake's scheduling semaphore a timespan after it is asked to, with one
    release waiting at a time unless a request falls due sooner (the rate limiter's second after
    a queue-input wait of ten; see ProcessChanges.coalesce_wakeups)."""

    def __init__(self, semaphore: threading.Semaphore):
        self.semaphore = semaphore
        self._lock = threading.Lock()
        self._due: Optional[float] = None  # when the waiting release falls due

    def schedule(self, delay: float) -> None:
        due = time.monotonic() + delay
        with self._lock:
            if self._due is not None and self._due <= due:
                return
            self._due = due
        timer = threading.Timer(delay, self._release, args=(due,))
        timer.name = REEVALUATION_THREAD
        timer.start()

    def _release(self, due: float) -> None:
        with self._lock:
            if self._due == due:
                self._due = None
        self.semaphore.release()


REEVALUATION_THREAD = "sticky-reevaluation"


def cancel_pending_reevaluations() -> None:
    """Snakemake's job rate limiter starts a Timer thread (not a daemon) in every scheduling round
    to look again one timespan later, and at exit the interpreter waits for the last one: up to
    1 s with the CLI's default 100/1s. Snakemake calls shutdown() after its last round, so they
    have nothing left to do."""
    for thread in threading.enumerate():
        function = getattr(thread, "function", None)
        snakemakes = "_schedule_reevalutation" in getattr(function, "__qualname__", "")
        if isinstance(thread, threading.Timer) and (snakemakes or thread.name == REEVALUATION_THREAD):
            thread.cancel()
