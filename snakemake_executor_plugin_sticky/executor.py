"""Snakemake face: sticky jobs go to resident workers, every other job to Snakemake's local executor.

A job is sticky when its rule declares `resources: sticky="<template>"`. Its declaration is
checked for the whole DAG before any job runs, the template's workers are started right away, and
each sticky job becomes one invocation on a worker holding the template. Snakemake's own
post-processing checks the outputs afterwards, as for any job.
"""

from __future__ import annotations

import atexit
import gc
import os
import sys
import threading
import traceback
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from snakemake_interface_common.exceptions import WorkflowError
from snakemake_interface_executor_plugins.executors.base import SubmittedJobInfo
from snakemake_interface_executor_plugins.executors.real import RealExecutor
from snakemake_interface_executor_plugins.jobs import JobExecutorInterface
from snakemake_interface_executor_plugins.settings import ExecMode

from .completions import CompletionBatcher
from .delegate import Delegate
from .invocation import Invocation, InvocationCrashedWorkers, InvocationResult, build_invocation, local_script_path
from .report import RunReport
from .settings import CLUSTERS, ExecutorSettings
from .templates import CONFIG_SECTION, RESOURCE, TemplateSpec, parse_templates

# The window that keeps short invocations flowing: this many jobs in flight per invocation slot.
QUEUED_PER_SLOT = 4
# From this many sticky jobs on, Snakemake's default scheduling rounds hold the workers up (480
# invocations of the demo: efficiency 0.65-0.69 with the defaults, 0.80-0.83 with the flags of
# README "Large runs").
MANY_STICKY_JOBS = 200

if TYPE_CHECKING:  # Dask loads with the engine, not whenever Snakemake lists its plugins
    from .backends.base import Backend



class Executor(RealExecutor):
    def __post_init__(self) -> None:
        self.settings: ExecutorSettings = self.workflow.executor_settings or ExecutorSettings()
        check_settings(self.settings)
        self.workdir = os.getcwd()
        self.templates = parse_templates(self.workflow.config, Path(self.workdir))
        self.delegate = Delegate(self.workflow, self.logger, self.settings)
        self._backend: Optional["Backend"] = None
        self._backend_lock = threading.Lock()
        self._cancelled = False
        self._errors = 0
        self._losses: dict[str, int] = {}
        self._stop_status = threading.Event()
        self._checked: dict[tuple[str, str], TemplateSpec] = {}
        self._scripts: dict[str, str] = {}
        self.completions = CompletionBatcher(on_error=self.report_failed)
        self._count_lock = threading.Lock()
        self._in_flight = 0  # invocations sent to workers and not back yet
        self._slots: dict[str, int] = {}  # invocation slots of each template's workers
        self._jobs_left: dict[str, int] = {}  # sticky jobs of each template not done yet
        # A checkpoint may add sticky jobs to the DAG later: then pools last until the run ends.
        self._retire_early = not any(rule.is_checkpoint for rule in self.workflow.rules)
        self.report = RunReport(self.templates, Path(self.workflow.persistence.path) / "sticky", self.logger)
        collect_less()
        used = self.templates_in_dag()
        if self.settings.cluster != "local" and not self.settings.scheduler:
            from .backends import jobqueue  # imported in the main thread: see there

            jobqueue.check_pools(list(used.values()), self.settings)
        try:
            for template in self.templates_ready_now(used):
                self.start_pool(template)
        except BaseException:
            # Snakemake never calls shutdown() for an executor that failed to start.
            self.completions.close(deliver=False)
            self.close_backend()
            collect_normally()
            raise
        self.warn_if_cores_limit(used)
        self.suggest_large_run_flags()

    # -- declarations -------------------------------------------------------------------------

    def templates_in_dag(self) -> dict[str, TemplateSpec]:
        """Check every sticky job that will run; return the templates they use, and count each
        template's jobs (see job_done)."""
        used = {}
        for job in self.dag.needrun_jobs():
            template = self.template_for(job)
            if template is not None:
                used[template.name] = template
                self._jobs_left[template.name] = self._jobs_left.get(template.name, 0) + 1
        return used

    def templates_ready_now(self, used: dict[str, TemplateSpec]) -> list[TemplateSpec]:
        """Templates with an invocation that can run at once: their workers start right away.

        The others start with their first invocation, once the jobs upstream of it are done, as
        a template's setup may read what those jobs write (a model built by the workflow, say).
        """
        names = {job.resources.get(RESOURCE) for job in self.dag.ready_jobs}
        return [template for name, template in used.items() if name in names]

    def template_for(self, job: JobExecutorInterface) -> Optional[TemplateSpec]:
        """The job's template, or None for a job that is not sticky; WorkflowError if misdeclared.
        A rule is checked once per template (and per script, when its path has wildcards)."""
        name = job.resources.get(RESOURCE)
        if name is None:
            return None
        checked = self._checked.get((job.rule.name, name))
        if checked is not None and job.rule.name in self._scripts:
            return checked
        template = self.check_sticky_job(job, name)
        self._checked[(job.rule.name, name)] = template
        return template

    def script_of(self, job: JobExecutorInterface) -> str:
        """The job's script path, resolved once per rule unless it has wildcards or params."""
        cached = self._scripts.get(job.rule.name)
        return cached if cached is not None else local_script_path(job)

    def check_sticky_job(self, job: JobExecutorInterface, name: str) -> TemplateSpec:
        rule = f"Rule '{job.rule.name}'"
        if not isinstance(name, str) or not name:
            raise WorkflowError(f"{rule}: resources: {RESOURCE}= must name a template, got {name!r}.")
        if name not in self.templates:
            defined = ", ".join(sorted(self.templates)) or "none"
            raise WorkflowError(
                f"{rule} asks for sticky template '{name}', which is not defined under "
                f"'{CONFIG_SECTION}:' in the workflow config (defined: {defined}). Define it there "
                f"or fix the rule's resources: {RESOURCE}=\"...\"."
            )
        if not job.is_script:
            raise WorkflowError(
                f"{rule} is sticky (template '{name}') but its body is {body_kind(job)}. Sticky "
                f"invocations run a Python script inside the worker: use script: \"scripts/<name>.py\"."
            )
        script = local_script_path(job)
        if "{" not in str(job.rule.script):
            self._scripts[job.rule.name] = script
        if not script.endswith(".py"):
            raise WorkflowError(
                f"{rule} is sticky (template '{name}') but its script '{job.rule.script}' is not a "
                f"Python file; only .py scripts can run inside a resident worker."
            )
        if job.is_shadow:
            raise WorkflowError(f"{rule} is sticky (template '{name}'): shadow rules cannot run in a resident worker.")
        if job.benchmark is not None:
            raise WorkflowError(
                f"{rule} is sticky (template '{name}'): benchmark: is not supported for sticky rules."
            )
        return self.templates[name]

    def warn_if_cores_limit(self, used: dict[str, TemplateSpec]) -> None:
        slots = sum(self.slots_of(t) for t in used.values())
        # With --jobs, Snakemake counts jobs in flight and no longer cores, as on any cluster.
        jobs = self.workflow.resource_settings.nodes
        limit, flag = (jobs, "--jobs") if jobs is not None else (self.workflow.resource_settings.cores, "--cores")
        if limit is not None and slots > limit:
            self.logger.warning(
                f"Sticky workers offer {slots} invocation slots but {flag} {limit} lets Snakemake "
                f"run at most {limit} jobs at once; raise {flag} to keep every worker busy."
            )
        elif limit is not None and limit < QUEUED_PER_SLOT * slots:
            self.logger.info(
                f"Sticky workers offer {slots} invocation slots and {flag} {limit} lets Snakemake run "
                f"{limit} jobs at once: a worker waits through a Snakemake scheduling round (10-30 ms) "
                f"between invocations. If they are short, {flag} {QUEUED_PER_SLOT * slots} keeps "
                f"invocations queued behind the running ones (docs/further.md, Concurrency)."
            )

    def suggest_large_run_flags(self) -> None:
        """Snakemake's default ILP scheduler solves a problem over every ready job in each round
        (25-80 ms with hundreds of them here), and a worker waits while it does."""
        sticky = sum(self._jobs_left.values())
        scheduling = self.workflow.scheduling_settings
        if sticky >= MANY_STICKY_JOBS and scheduling is not None and scheduling.scheduler == "ilp":
            self.logger.info(
                f"{sticky} sticky jobs under Snakemake's default ILP scheduler, which solves a problem "
                f"over all ready jobs in every round while the workers wait. For runs this large, use "
                f"the flags of the README's 'Large runs': --scheduler greedy (or firstfit), "
                f"--max-jobs-per-timespan 100000/1s, --cores about 16 x workers x slots."
            )

    # -- engine -------------------------------------------------------------------------------

    @property
    def backend(self) -> "Backend":
        with self._backend_lock:
            if self._backend is None:
                self._backend = make_backend(self.workdir, self.settings, self.logger, self.worker_event)
                if self.settings.status_interval > 0:
                    threading.Thread(target=self.log_status, name="sticky-status", daemon=True).start()
            return self._backend

    def start_pool(self, template: TemplateSpec) -> None:
        started = self.backend.start_pool(template)
        if started:
            self.report.workers_requested(template, started)
            self.report.start_painter()
        with self._count_lock:
            if template.name not in self._slots:
                self._slots[template.name] = self.slots_of(template)

    def slots_of(self, template: TemplateSpec) -> int:
        """Invocations the template's workers run at once."""
        return self.backend.workers_for(template) * template.slots

    def job_done(self, template: TemplateSpec) -> None:
        """When the last job of a template is done, its workers retire at once rather than at the
        end of the run: their memory and GPUs go back while the rest of the workflow runs (and
        their teardown overlaps it). A failed job is not done: its retry needs the workers."""
        with self._count_lock:
            left = self._jobs_left[template.name] = self._jobs_left.get(template.name, 0) - 1
            if left != 0 or not self._retire_early:
                return
            self._slots.pop(template.name, None)
            all_done = not any(self._jobs_left.values())
        self.report.retiring(template.name)
        count = self.backend.retire_pool(template)
        if count:
            self.logger.info(f"Sticky template '{template.name}': all its jobs are done; retiring {count} worker(s).")
        if all_done:
            self.report.sticky_jobs_done()

    def worker_event(self, message: dict) -> None:
        """Engine events: feed the report; replace workers of hung invocations; charge a lost
        worker to the invocations it was running, or else to its template's loss budget."""
        lost = self.report.worker_event(message)
        if message.get("event") == "invocation-timeout":
            self.invocation_timed_out(message)
        if lost is None:
            return
        running = message.get("running") or []
        if running:
            self.backend.worker_lost(message["address"], running)
            return
        losses = self._losses[lost.template] = self._losses.get(lost.template, 0) + 1
        if losses > self.settings.max_worker_losses:
            self.backend.fail_pool(
                self.templates[lost.template],
                f"Sticky template '{lost.template}' lost {losses} workers while no invocation ran on "
                f"them, more than --sticky-max-worker-losses {self.settings.max_worker_losses}; its "
                "invocations fail.",
            )

    def invocation_timed_out(self, message: dict) -> None:
        limit = (
            f"Invocation of rule '{message['rule']}' timed out after {message['timeout_s']:g} s "
            f"(--sticky-invocation-timeout, or the rule's runtime resource)"
        )
        if self.backend.replaces_hung_workers:
            reason = (
                f"{limit}; its worker {message['name']} is replaced, as the hung invocation cannot be "
                "stopped otherwise."
            )
            self.report.expect_removal(message["address"])
        else:
            reason = (
                f"{limit}. Its worker {message['name']} ({message['address']}, pid {message['pid']}) is "
                "yours (attach mode) and is left as it is, the hung invocation's thread still running in it."
            )
        self.logger.warning(reason)
        self.backend.abandon(message["key"], reason, message["address"])

    def log_status(self) -> None:
        while not self._stop_status.wait(self.settings.status_interval):
            line = self.report.status_line()
            if line:
                self.logger.info(line)

    def close_backend(self, status: Optional[str] = None, cancel: bool = False) -> None:
        """End the workers; with a status, write the report of the run."""
        self._stop_status.set()
        if self._backend is None:
            return
        self.report.closing = True
        for name, count in self.report.workers_alive().items():
            self.logger.info(f"Sticky template '{name}': retiring {count} worker(s).")
        try:
            self._backend.cancel() if cancel else self._backend.close()
        finally:
            if status is not None:
                self.report.write(status)
            else:
                self.report.dismiss_painter()

    # -- jobs ---------------------------------------------------------------------------------

    def run_jobs(self, jobs: list[JobExecutorInterface]) -> None:
        """The jobs of one scheduling round: sticky ones go to the workers in one batch."""
        sticky = []
        for job in jobs:
            self.run_job_pre(job)
            routed = self.route(job)
            if routed is not None:
                sticky.append(routed)
        if sticky:
            self.dispatch(sticky)

    def run_job(self, job: JobExecutorInterface) -> None:
        routed = self.route(job)
        if routed is not None:
            self.dispatch([routed])

    def route(self, job: JobExecutorInterface) -> Optional[tuple[JobExecutorInterface, TemplateSpec]]:
        """Hand a job that is not sticky to the other executor; a sticky one comes back with its
        template, whose workers are started. Groups may not contain sticky rules."""
        if job.is_group():
            sticky = [j.rule.name for j in job if j.resources.get(RESOURCE) is not None]
            if sticky:
                raise WorkflowError(f"Sticky rule(s) {', '.join(sticky)} cannot run in a pipe or service group.")
            template = None
        else:
            template = self.template_for(job)
        if template is None:
            self.delegate.run_job(job)
            return None
        self.start_pool(template)
        return job, template

    def dispatch(self, jobs: list[tuple[JobExecutorInterface, TemplateSpec]]) -> None:
        """Prepare each job as the local executor does, mark it started, send the batch to the
        workers. This runs in Snakemake's scheduler thread, as the local executor's preparation
        does: `job.prepare()` and the job's params read and change Snakemake's state (the DAG,
        the I/O cache, input functions), which that thread also changes."""
        if self._cancelled:
            return
        batch = []
        for job, template in jobs:
            job_info = SubmittedJobInfo(job=job)
            try:
                self.workflow.async_run(job.prepare())
                invocation = build_invocation(
                    job, template, self.script_of(job), self.workflow.config, self.settings.invocation_timeout
                )
                job_info.external_jobid = invocation.key
                self.report_job_submission(job_info)
                self.report.invocation_submitted(invocation)
            except Exception as e:
                self.report_job_error(job_info, msg=f"Sticky job could not be dispatched: {type(e).__name__}: {e}")
                continue
            batch.append((invocation, partial(self.invocation_done, job_info)))
        with self._count_lock:
            self._in_flight += len(batch)
        self.backend.submit(batch)

    def invocation_done(self, job_info: SubmittedJobInfo, invocation: Invocation, outcome: Any) -> None:
        try:
            self.report.invocation_finished(invocation, outcome)
        except Exception as e:  # the record is lost, never the job: Snakemake must hear of it
            self.logger.warning(f"Sticky report: invocation of rule '{invocation.rule}' not recorded: {e!r}")
        with self._count_lock:
            self._in_flight -= 1
            # Snakemake must hear now when the workers are about to run out of queued invocations:
            # fewer than one waiting behind each running one
            running_low = self._in_flight <= 2 * sum(self._slots.values())
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
        self.logger.error(f"Sticky: a finished invocation could not be reported to Snakemake: {error!r}")

    def tell_snakemake(self, job_info: SubmittedJobInfo, invocation: Invocation, outcome: Any) -> None:
        """Hand the invocation's output to Snakemake's log and report the job done or failed."""
        if self._cancelled:
            return  # Ctrl-C: Snakemake is already tearing down, as with the local executor
        if isinstance(outcome, InvocationCrashedWorkers):
            deaths = "; ".join(self.report.describe_worker(address) for address in outcome.workers)
            self.report_job_error(
                job_info,
                msg=f"Sticky invocation of rule '{invocation.rule}' (template '{invocation.template}') "
                f"crashed its worker {len(outcome.workers)} times: it was running each time a worker "
                f"died ({deaths}). It fails alone; the other invocations go on. A native crash (a "
                "segfault, a CUDA abort) or the OOM killer ends a worker so. "
                f"--sticky-invocation-crashes ({self.settings.invocation_crashes}) sets how many times.",
            )
            return
        if not isinstance(outcome, InvocationResult):
            hint = (
                " It was running on too many workers that died (Dask's distributed.scheduler.allowed-failures)."
                if type(outcome).__name__ == "KilledWorker"
                else ""
            )
            self.report_job_error(
                job_info,
                msg=f"Sticky invocation of template '{invocation.template}' did not complete: "
                f"{type(outcome).__name__}: {outcome}{hint}",
            )
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

    def handle_job_success(self, job: JobExecutorInterface) -> None:
        if not is_sticky(job):
            self.delegate.handle_job_success(job)

    def handle_job_error(self, job: JobExecutorInterface) -> None:
        self._errors += 1
        if not is_sticky(job):
            self.delegate.handle_job_error(job)

    def shutdown(self) -> None:
        self.completions.close()
        try:
            self.delegate.shutdown()
        finally:
            self.close_backend("failed" if self._errors else "success")
            cancel_pending_reevaluations()
            collect_normally()

    def cancel(self) -> None:
        self._cancelled = True
        self.completions.close(deliver=False)
        try:
            self.delegate.cancel()
        finally:
            self.close_backend("cancelled", cancel=True)
            collect_normally()

    # -- RealExecutor -------------------------------------------------------------------------

    @property
    def cores(self) -> Optional[int]:
        return self.workflow.resource_settings.cores

    def get_exec_mode(self) -> ExecMode:
        return ExecMode.SUBPROCESS

    def get_python_executable(self) -> str:
        return sys.executable


def cancel_pending_reevaluations() -> None:
    """Snakemake's job rate limiter starts a Timer thread (not a daemon) in every scheduling round
    to look again one timespan later, and at exit the interpreter waits for the last one: up to
    1 s with the CLI's default 100/1s. Snakemake calls shutdown() after its last round, so they
    have nothing left to do."""
    for thread in threading.enumerate():
        function = getattr(thread, "function", None)
        if isinstance(thread, threading.Timer) and "_schedule_reevalutation" in getattr(function, "__qualname__", ""):
            thread.cancel()


def collect_less() -> None:
    """Python's full garbage collections walk every object Snakemake made before the run (the
    workflow, the DAG): one took 64 ms mid-run in the demo, a stall of every thread here, the Dask
    scheduler's included. Those objects are frozen out of collections while the run lasts
    (`collect_normally` puts them back). At interpreter exit they are frozen again, which skips
    the last collection: about 0.4 s after the run is over. Files, workers and logs are closed
    before then, not by the collector."""
    gc.freeze()
    atexit.unregister(gc.freeze)
    atexit.register(gc.freeze)


def collect_normally() -> None:
    """After the run: a process that runs more workflows through the API collects this one's."""
    gc.unfreeze()


def make_backend(workdir: str, settings: ExecutorSettings, log: Any, on_event: Any) -> "Backend":
    """The engine the settings ask for: attached to a scheduler, batch jobs, or embedded."""
    if settings.scheduler:
        from .backends.attach import AttachedBackend

        return AttachedBackend(workdir, settings, log, on_event)
    if settings.cluster != "local":
        from .backends.jobqueue import BatchBackend

        return BatchBackend(workdir, settings, log, on_event)
    from .backends.local import EmbeddedBackend

    return EmbeddedBackend(workdir, settings, log, on_event)


def is_sticky(job: JobExecutorInterface) -> bool:
    return not job.is_group() and job.resources.get(RESOURCE) is not None


def body_kind(job: JobExecutorInterface) -> str:
    for kind in ("shell", "notebook", "wrapper", "cwl", "template_engine", "norun"):
        if getattr(job, f"is_{kind}", False):
            return {"norun": "empty (no run/shell/script)"}.get(kind, f"{kind}:")
    return "run:"


def check_settings(settings: ExecutorSettings) -> None:
    if settings.cluster not in CLUSTERS:
        raise WorkflowError(f"--sticky-cluster must be one of {', '.join(CLUSTERS)}, got {settings.cluster!r}.")
    if settings.scheduler and settings.cluster != "local":
        raise WorkflowError(
            "--sticky-scheduler (attach to your own workers) and --sticky-cluster "
            f"{settings.cluster} (start batch-job workers) exclude each other; give one."
        )
    if settings.max_workers < 1:
        raise WorkflowError(f"--sticky-max-workers must be at least 1, got {settings.max_workers}.")
    if settings.idle_timeout < 0:
        raise WorkflowError(f"--sticky-idle-timeout must not be negative, got {settings.idle_timeout}.")
    if settings.job_cores is not None and settings.job_cores < 1:
        raise WorkflowError(f"--sticky-job-cores must be at least 1, got {settings.job_cores}.")
    if settings.workers is not None and settings.workers < 1:
        raise WorkflowError(f"--sticky-workers must be at least 1, got {settings.workers}.")
    if settings.setup_attempts < 1:
        raise WorkflowError(f"--sticky-setup-attempts must be at least 1, got {settings.setup_attempts}.")
    if settings.max_worker_losses < 0:
        raise WorkflowError(f"--sticky-max-worker-losses must not be negative, got {settings.max_worker_losses}.")
    if settings.invocation_crashes < 1:
        raise WorkflowError(f"--sticky-invocation-crashes must be at least 1, got {settings.invocation_crashes}.")
    if settings.invocation_timeout is not None and settings.invocation_timeout <= 0:
        raise WorkflowError(f"--sticky-invocation-timeout must be positive, got {settings.invocation_timeout}.")
    if settings.preempt_grace < 0:
        raise WorkflowError(f"--sticky-preempt-grace must not be negative, got {settings.preempt_grace}.")
    if settings.teardown_grace < 0:
        raise WorkflowError(f"--sticky-teardown-grace must not be negative, got {settings.teardown_grace}.")
    if settings.stage_readers < 1:
        raise WorkflowError(f"--sticky-stage-readers must be at least 1, got {settings.stage_readers}.")
    if settings.cache_size is not None:
        from dask.utils import parse_bytes

        try:
            parse_bytes(settings.cache_size)
        except (ValueError, TypeError) as e:
            raise WorkflowError(f"--sticky-cache-size {settings.cache_size!r} is not a size such as 200GB ({e}).") from e
    if settings.status_interval < 0:
        raise WorkflowError(f"--sticky-status-interval must not be negative, got {settings.status_interval}.")
    if settings.setup_retry_delay < 0:
        raise WorkflowError(f"--sticky-setup-retry-delay must not be negative, got {settings.setup_retry_delay}.")
