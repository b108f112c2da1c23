"""Snakemake face: sticky jobs go to resident workers, every other job to the delegate.

The processes of a run and their channels (embedded engine; with batch jobs the workers run
on compute nodes, in attach mode the scheduler runs elsewhere):

    Snakemake process (head/)                            resident worker (worker/, api/)
    +---------------------------------------+  TLS    +----------------------------------+
    | Snakemake's scheduler thread          |         | Dask worker + StickyWorkerPlugin |
    |   Executor.run_jobs -> Invocation ----+-------->|   ResidentState: built once      |
    |   CompletionBatcher <- InvocationResult <-------+   run_invocation: the script in  |
    | Dask scheduler thread                 |         |   isolation/, with the state     |
    |   WorkerRemovalPlugin: Removed        |  events |   Batcher, stage() (api/)        |
    |   wire.Event -> RunReport, Executor   |<--------+----------------------------------+
    | delegate: jobs that are not sticky    |               ^ a Nanny per worker, forked
    +---------------------------------------+               | from the forkserver; batch
      forkserver process (the workers' reaper) -------------+ jobs and other environments
      timeline painter process                                under a supervisor

A job is sticky when its rule declares `resources: sticky="<template>"`. Its declaration is
checked for the whole DAG before any job runs (declarations.py), the template's workers are
started right away (engines/), and each sticky job becomes one `wire.Invocation` (invocations.py)
that runs on a worker holding the template (worker/task.py). Its outcome comes back through the
engine, is reported to Snakemake a few at a time (completions.py), and Snakemake's own
post-processing checks the outputs, as for any job. Jobs that are not sticky go to the local
executor or another executor plugin (delegate.py).
"""

from __future__ import annotations

import os
import sys
import threading
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from snakemake_interface_common.exceptions import WorkflowError
from snakemake_interface_executor_plugins.executors.base import SubmittedJobInfo
from snakemake_interface_executor_plugins.executors.real import RealExecutor
from snakemake_interface_executor_plugins.jobs import JobExecutorInterface
from snakemake_interface_executor_plugins.settings import ExecMode

from ..settings import ExecutorSettings
from ..templates import TemplateSpec
from ..wire import Event, Invocation, InvocationResult, InvocationTimedOut, Removed, WorkerExited
from . import forkserver, history
from .advice import firstfit_installed, large_run_advice, window_advice
from .chunking import Chunking
from .completions import CompletionBatcher
from .declarations import check_declarations, is_sticky, ready_templates, sticky_rules_in_group
from .delegate import Delegate
from .environments import launch_command, probe
from .fence import Fence
from .history import forecasts_for
from .invocations import InvocationCrashedWorkers, build_invocation
from .process_changes import ProcessChanges, cancel_pending_reevaluations
from .report import RunReport, WorkerRecord
from .template_jobs import TemplateJobs
from .validation import check_settings

ACCEPT_THREADS = 4  # fenced results whose files are put in place at once

if TYPE_CHECKING:  # Dask loads with the engine, not whenever Snakemake lists its plugins
    from .engines.base import Backend, Member


class Executor(RealExecutor):
    """Runs sticky jobs as invocations in resident workers and hands the others on."""

    def __post_init__(self) -> None:
        self.settings: ExecutorSettings = self.workflow.executor_settings or ExecutorSettings()
        check_settings(self.settings)
        self.changes = ProcessChanges()
        if self.settings.cluster == "local" and not self.settings.scheduler and forkserver.available():
            # Local workers are forked from it: started first, it imports Dask on the other core
            # while this process does the rest of its start (see forkserver.py).
            self.changes.on_undo(forkserver.start_forkserver())
        self.workdir = os.getcwd()
        # the run refuses a misdeclared job before any worker starts, as a dry run does (dryrun.py)
        self.declarations, used, jobs = check_declarations(self.workflow, self.dag.needrun_jobs(), self.settings)
        self.templates = self.declarations.templates
        self.delegate = Delegate(self.workflow, self.logger, self.settings)
        self._backend: Optional["Backend"] = None
        self._backend_lock = threading.Lock()
        self._cancelled = False
        self._wakeups_coalesced = False
        self._placed: set[str] = set()  # identities of the templates whose environment is checked
        self._errors = 0
        self._stop_status = threading.Event()
        window = self.cores if isinstance(self.cores, int) else 0  # the jobs Snakemake runs at once
        self.completions = CompletionBatcher(on_error=self.report_failed, batch=window // 2)
        self.chunking = Chunking()
        self._accepting = ThreadPoolExecutor(ACCEPT_THREADS, thread_name_prefix="sticky-accept")
        self.report = RunReport(self.templates, Path(self.workflow.persistence.path) / "sticky", self.logger)
        for forecast in forecasts_for(self.dag.needrun_jobs(), used, self.settings, Path(self.workdir)):
            self.report.forecasts[forecast.plan.template] = forecast
        self.changes.freeze_collections()
        self.changes.skip_pipe_lookups(self.workflow.rules)
        self._closing = self.changes.quiet_closing_noise()
        for note in sorted(self.declarations.notes):
            self.logger.info(note)
        # A checkpoint may add sticky jobs to the DAG later: then pools last until the run ends.
        checkpoints = any(rule.is_checkpoint for rule in self.workflow.rules)
        self.template_jobs = TemplateJobs(jobs, retire_early=not checkpoints)
        try:
            used = {name: self.place(template) for name, template in used.items()}
            for template in ready_templates(used, self.dag.ready_jobs):
                self.start_pool(template)
        except BaseException:
            # Snakemake never calls shutdown() for an executor that failed to start.
            self.completions.close(deliver=False)
            self.close_backend()
            self.changes.undo()
            raise
        self.advise(used)

    def place(self, template: TemplateSpec) -> TemplateSpec:
        """Where the template's workers run: its environment is made (or found) and checked once,
        before any of its workers starts (templates that a checkpoint brings later included);
        WorkflowError naming the template and the environment."""
        env = template.environment
        if env is None or template.identity in self._placed:
            return template
        name = template.name
        command: tuple[str, ...] = ()
        if self.settings.scheduler:
            self.logger.info(
                f"Sticky template '{name}': its {env.describe()} is not used: in attach mode the workers "
                "are yours, and run in the environment you started them in; start them there."
            )
        else:
            command = launch_command(env, name, self.workflow, self.dag, self.logger)
            if command:
                python = probe(env, command, name)["python"]
                self.logger.info(f"Sticky template '{name}': workers run in {env.describe()}, Python {python}.")
        placed = replace(template, launch=command)
        self.templates[name] = placed
        self._placed.add(template.identity)
        return placed

    def advise(self, used: dict[str, TemplateSpec]) -> None:
        """Say at the start when Snakemake's own flags will hold the workers back."""
        slots = sum(self.slots_of(t) for t in used.values())
        resources = self.workflow.resource_settings
        window = window_advice(slots, resources.cores, resources.nodes)
        if window is not None:
            level, text = window
            (self.logger.warning if level == "warning" else self.logger.info)(text)
        large = large_run_advice(self.template_jobs.sticky_jobs, *scheduling_of(self.workflow), firstfit_installed())
        if large is not None:
            level, text = large
            (self.logger.warning if level == "warning" else self.logger.info)(text)

    # -- engine -------------------------------------------------------------------------------

    @property
    def backend(self) -> "Backend":
        """The engine, made with the first pool that needs it."""
        with self._backend_lock:
            if self._backend is None:
                self._backend = make_backend(self.workdir, self.settings, self.logger, self.worker_event, self.changes)
                if self.settings.status_interval > 0:
                    threading.Thread(target=self.log_status, name="sticky-status", daemon=True).start()
            return self._backend

    def start_pool(self, template: TemplateSpec) -> None:
        """Start the template's workers unless they run, and count its slots."""
        started = self.backend.start_pool(template)
        if started:
            self.report.workers_requested(template, started)
            self.report.start_painter()
        self.template_jobs.offer(template.name, self.slots_of(template))

    def slots_of(self, template: TemplateSpec) -> int:
        """Invocations the template's workers run at once."""
        return self.backend.workers_for(template) * template.slots

    def job_done(self, template: TemplateSpec) -> None:
        """When the last job of a template is done, its workers retire at once rather than at the
        end of the run: their memory and GPUs go back while the rest of the workflow runs (and
        their teardown overlaps it). A failed job is not done: its retry needs the workers."""
        retire, all_done = self.template_jobs.job_done(template.name)
        if not retire:
            return
        self.report.retiring(template.name)
        count = self.backend.retire_pool(template)
        if count:
            self.logger.info(f"Sticky template '{template.name}': all its jobs are done; retiring {count} worker(s).")
        if all_done:
            self.report.sticky_jobs_done()

    def worker_event(self, event: Event) -> None:
        """Engine events: the report records each; the executor acts on three kinds."""
        lost = self.report.record(event)
        if isinstance(event, InvocationTimedOut):
            self.invocation_timed_out(event)
        elif isinstance(event, WorkerExited):
            self.backend.worker_exited(event.address)
        elif isinstance(event, Removed):
            if not event.graceful and self.backend.fence is not None:
                self.backend.fence.worker_left(event.address, event.name, event.running)
            if lost is not None:
                self.worker_lost(event, lost)
            self.backend.worker_removed(event.address)

    def worker_lost(self, event: Removed, lost: WorkerRecord) -> None:
        """Charge a lost worker to the invocations it was running, or else to its template's
        loss budget."""
        if event.running:
            self.backend.worker_lost(event.address, list(event.running))
            return
        losses = self.template_jobs.lost_worker(lost.template)
        if losses > self.settings.max_worker_losses:
            self.backend.fail_pool(
                self.templates[lost.template],
                f"Sticky template '{lost.template}' lost {losses} workers while no invocation ran on "
                f"them, more than --sticky-max-worker-losses {self.settings.max_worker_losses}; its "
                "invocations fail.",
            )

    def invocation_timed_out(self, event: InvocationTimedOut) -> None:
        """Fail the hung invocation; replace its worker where the worker is ours."""
        limit = (
            f"Invocation of rule '{event.rule}' timed out after {event.timeout_s:g} s "
            f"(--sticky-invocation-timeout, or the rule's runtime resource)"
        )
        if self.backend.replaces_hung_workers:
            reason = (
                f"{limit}; its worker {event.name} is replaced, as the hung invocation cannot be stopped otherwise."
            )
            self.report.expect_removal(event.address)
        else:
            reason = (
                f"{limit}. Its worker {event.name} ({event.address}, pid {event.pid}) is yours (attach mode) "
                "and is left as it is, the hung invocation's thread still running in it."
            )
        self.logger.warning(reason)
        self.backend.abandon(event.key, reason, event.address)

    def log_status(self) -> None:
        """Every --sticky-status-interval seconds, a compact status line in the log."""
        while not self._stop_status.wait(self.settings.status_interval):
            line = self.report.status_line()
            if line:
                self.logger.info(line)

    def close_backend(self, status: Optional[str] = None, cancel: bool = False) -> None:
        """End the workers; with a status, write the report of the run."""
        self._stop_status.set()
        if self._backend is None:
            return
        self._closing.set()
        self.report.closing = True
        for name, count in self.report.workers_alive(retiring=False).items():
            self.logger.info(f"Sticky template '{name}': retiring {count} worker(s).")
        if cancel:
            self.logger.info(
                f"Sticky: waiting up to {self.settings.teardown_grace:g} s for the templates' teardown; "
                "press Ctrl-C again to stop at once."
            )
        try:
            self._backend.cancel() if cancel else self._backend.close()
        finally:
            if status is not None:
                report = self.report.write(status)
                if report is not None:
                    local = self.settings.cluster == "local" and not self.settings.scheduler
                    cluster = "attached" if self.settings.scheduler else self.settings.cluster
                    line = history.entry(report, cluster, os.cpu_count() if local else None)
                    history.record(Path(self.workdir), line)
            else:
                self.report.dismiss_painter()

    # -- jobs ---------------------------------------------------------------------------------

    def run_jobs(self, jobs: list[JobExecutorInterface]) -> None:
        """The jobs of one scheduling round: sticky ones go to the workers in one batch."""
        if not self._wakeups_coalesced:
            self._wakeups_coalesced = True
            self.changes.coalesce_wakeups(self.workflow.scheduler)
        sticky = []
        for job in jobs:
            self.run_job_pre(job)
            routed = self.route(job)
            if routed is not None:
                sticky.append(routed)
        if sticky:
            self.dispatch(sticky)

    def run_job(self, job: JobExecutorInterface) -> None:
        """One job outside a scheduling pass (Snakemake's API): as run_jobs."""
        routed = self.route(job)
        if routed is not None:
            self.dispatch([routed])

    def route(self, job: JobExecutorInterface) -> Optional[tuple[JobExecutorInterface, TemplateSpec]]:
        """Hand a job that is not sticky to the delegate; a sticky one comes back with its
        template, whose workers are started. Groups may not contain sticky rules."""
        if job.is_group():
            sticky = sticky_rules_in_group(job)
            if sticky:
                raise WorkflowError(f"Sticky rule(s) {', '.join(sticky)} cannot run in a pipe or service group.")
            template = None
        else:
            template = self.declarations.template_for(job)
        if template is None:
            self.delegate.run_job(job)
            return None
        template = self.place(template)
        self.start_pool(template)
        return job, template

    def dispatch(self, jobs: list[tuple[JobExecutorInterface, TemplateSpec]]) -> None:
        """Prepare each job as the local executor does, mark it started, send the batch to the
        workers. This runs in Snakemake's scheduler thread, as the local executor's preparation
        does: `job.prepare()` and the job's params read and change Snakemake's state (the DAG,
        the I/O cache, input functions), which that thread also changes."""
        if self._cancelled:
            return
        batch: dict[str, list[Member]] = {}
        prepared = self.workflow.async_run(prepare_all([job for job, _ in jobs]))
        for (job, template), error in zip(jobs, prepared):
            job_info = SubmittedJobInfo(job=job)
            try:
                if error is not None:
                    raise error
                invocation = build_invocation(
                    job,
                    template,
                    self.declarations.script_of(job),
                    self.workflow.config,
                    self.settings.invocation_timeout,
                )
                if self.backend.fence is not None:
                    invocation.attempts = str(self.backend.fence.folder)
                invocation.cleanup_scripts = self.workflow.execution_settings.cleanup_scripts
                job_info.external_jobid = invocation.key
                self.report_job_submission(job_info)
                self.report.invocation_submitted(invocation)
            except Exception as e:
                self.report_job_error(job_info, msg=f"Sticky job could not be dispatched: {type(e).__name__}: {e}")
                continue
            batch.setdefault(template.name, []).append((invocation, partial(self.invocation_done, job_info)))
        self.template_jobs.sent(sum(map(len, batch.values())))
        self.backend.submit([task for name, members in batch.items() for task in self.tasks_of(name, members)])

    def tasks_of(self, name: str, members: list[Member]) -> list[list[Member]]:
        """A template's invocations of one pass in Dask tasks, rule by rule (chunking.py)."""
        template = self.templates[name]
        by_rule: dict[str, list[Member]] = {}
        for member in members:
            by_rule.setdefault(member[0].rule, []).append(member)
        slots = self.slots_of(template)
        tasks = [
            task for rule, ms in by_rule.items() for task in self.chunking.split((template.identity, rule), ms, slots)
        ]
        self.report.tasks_sent(name, len(tasks))
        return tasks

    def invocation_done(self, job_info: SubmittedJobInfo, invocation: Invocation, outcome: Any) -> None:
        """An invocation's outcome is back. Where the run fences its workers, its files are
        accepted (fence.py) in a thread of a pool of its own, so that no result waits for the
        files of another; then, or at once, it is recorded and reported."""
        if self.backend.fence is not None:
            self._accepting.submit(self.accept, self.backend.fence, job_info, invocation, outcome)
        else:
            self.report_done(job_info, invocation, outcome)

    def accept(self, fence: Fence, job_info: SubmittedJobInfo, invocation: Invocation, outcome: Any) -> None:
        """Put the fenced attempt's files in place, then report the outcome, whatever happened."""
        try:
            outcome = fence.accept(invocation, outcome)
        except Exception as e:  # the job fails with the cause; the others go on
            traceback.print_exc()
            outcome = RuntimeError(f"The files of the invocation could not be put in place: {type(e).__name__}: {e}")
        self.report_done(job_info, invocation, outcome)

    def report_done(self, job_info: SubmittedJobInfo, invocation: Invocation, outcome: Any) -> None:
        """Record the invocation's outcome and queue its report to Snakemake."""
        if isinstance(outcome, InvocationResult):
            self.chunking.observe((invocation.identity, invocation.rule), outcome.finished - outcome.started)
        try:
            self.report.invocation_finished(invocation, outcome)
        except Exception as e:  # the record is lost, never the job: Snakemake must hear of it
            self.logger.warning(f"Sticky report: invocation of rule '{invocation.rule}' not recorded: {e!r}")
        running_low = self.template_jobs.returned()
        ok = isinstance(outcome, InvocationResult) and outcome.ok
        self.completions.add(
            partial(self.tell_snakemake, job_info, invocation, outcome),
            urgent=running_low or not ok,
            fallback=partial(self.report_undeliverable, job_info, invocation),
        )

    def report_undeliverable(self, job_info: SubmittedJobInfo, invocation: Invocation, error: BaseException) -> None:
        """The invocation's outcome could not be handed to Snakemake: its job fails with why."""
        traceback.print_exception(error)
        self.report_job_error(
            job_info,
            msg=f"Sticky invocation of rule '{invocation.rule}' finished, but its outcome could not be "
            f"handed to Snakemake: {type(error).__name__}: {error}",
        )

    def report_failed(self, error: BaseException) -> None:
        """A report and its fallback both failed: say so in the log."""
        self.logger.error(f"Sticky: a finished invocation could not be reported to Snakemake: {error!r}")

    def tell_snakemake(self, job_info: SubmittedJobInfo, invocation: Invocation, outcome: Any) -> None:
        """Hand the invocation's output to Snakemake's log and report the job done or failed."""
        if self._cancelled:
            return  # Ctrl-C: Snakemake is already tearing down, as with the local executor
        if not isinstance(outcome, InvocationResult):
            self.report_job_error(job_info, msg=self.not_completed(invocation, outcome))
            return
        if outcome.stdout:
            sys.stdout.write(outcome.stdout)
            sys.stdout.flush()
        if outcome.stderr:
            sys.stderr.write(outcome.stderr)
            sys.stderr.flush()
        if outcome.ok:
            self.report_job_success(job_info)
            self.job_done(self.templates[invocation.template])
        else:
            self.report_job_error(
                job_info,
                msg=f"Sticky invocation failed on worker {outcome.worker} "
                f"(template '{invocation.template}', pid {outcome.pid}):\n{outcome.error}",
            )

    def not_completed(self, invocation: Invocation, outcome: BaseException) -> str:
        """Why an invocation came back without a result: it crashed its workers, was cancelled,
        its template failed."""
        if isinstance(outcome, InvocationCrashedWorkers):
            deaths = "; ".join(self.report.describe_worker(address) for address in outcome.workers)
            return (
                f"Sticky invocation of rule '{invocation.rule}' (template '{invocation.template}') "
                f"crashed its worker {len(outcome.workers)} times: it was running each time a worker "
                f"died ({deaths}). It fails alone; the other invocations go on. A native crash (a "
                "segfault, a CUDA abort) or the OOM killer ends a worker so. "
                f"--sticky-invocation-crashes ({self.settings.invocation_crashes}) sets how many times."
            )
        hint = (
            " It was running on too many workers that died (Dask's distributed.scheduler.allowed-failures)."
            if type(outcome).__name__ == "KilledWorker"
            else ""
        )
        return (
            f"Sticky invocation of template '{invocation.template}' did not complete: "
            f"{type(outcome).__name__}: {outcome}{hint}"
        )

    def handle_job_success(self, job: JobExecutorInterface) -> None:
        """Snakemake saw a job succeed: the delegate hears of its own jobs."""
        if not is_sticky(job):
            self.delegate.handle_job_success(job)

    def handle_job_error(self, job: JobExecutorInterface) -> None:
        """Snakemake saw a job fail: count it; the delegate hears of its own jobs."""
        self._errors += 1
        if not is_sticky(job):
            self.delegate.handle_job_error(job)

    def shutdown(self) -> None:
        """The run is over: deliver what waits, end the delegate and the engine, write the report."""
        self._accepting.shutdown(wait=False)
        self.completions.close()
        try:
            self.delegate.shutdown()
        finally:
            self.close_backend("failed" if self._errors else "success")
            cancel_pending_reevaluations()
            self.changes.undo()

    def cancel(self) -> None:
        """Ctrl-C: drop what waits, cancel the delegate and the engine, write the report."""
        self._cancelled = True
        self._accepting.shutdown(wait=False, cancel_futures=True)
        self.completions.close(deliver=False)
        try:
            self.delegate.cancel()
        finally:
            self.close_backend("cancelled", cancel=True)
            self.changes.undo()

    # -- RealExecutor -------------------------------------------------------------------------

    @property
    def cores(self) -> Optional[int]:
        """The cores Snakemake was given."""
        return self.workflow.resource_settings.cores

    def get_exec_mode(self) -> ExecMode:
        """Jobs that are not sticky run as subprocesses, as under the local executor."""
        return ExecMode.SUBPROCESS

    def get_python_executable(self) -> str:
        """The Python of the Snakemake process."""
        return sys.executable


def make_backend(
    workdir: str, settings: ExecutorSettings, log: Any, on_event: Any, changes: ProcessChanges
) -> "Backend":
    """The engine the settings ask for: attached to a scheduler, batch jobs, or embedded."""
    if settings.scheduler:
        from .engines.attach import AttachedBackend

        return AttachedBackend(workdir, settings, log, on_event)
    if settings.cluster != "local":
        from .engines.jobqueue import BatchBackend

        return BatchBackend(workdir, settings, log, on_event, changes)
    from .engines.local import EmbeddedBackend

    return EmbeddedBackend(workdir, settings, log, on_event, changes)


def scheduling_of(workflow: Any) -> tuple[Optional[str], Optional[int], Optional[float]]:
    """Snakemake's scheduler, its subsample and the job starts a second it allows."""
    scheduling = workflow.scheduling_settings
    if scheduling is None:
        return None, None, None
    limit = scheduling.max_jobs_per_timespan
    rate = limit.max_jobs / limit.timespan if limit is not None and limit.timespan else None
    return scheduling.scheduler, scheduling.subsample, rate


async def prepare_all(jobs: list[JobExecutorInterface]) -> list[Optional[Exception]]:
    """`job.prepare()` for a round's jobs in one run of Snakemake's event loop (a run of its own
    per job costs as much as a no-op job's preparation); each job's error, or None."""
    errors: list[Optional[Exception]] = []
    for job in jobs:
        try:
            await job.prepare()
            errors.append(None)
        except Exception as e:
            errors.append(e)
    return errors
