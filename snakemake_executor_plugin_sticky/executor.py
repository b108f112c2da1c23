"""Snakemake face: sticky jobs go to resident workers, every other job to Snakemake's local executor.

A job is sticky when its rule declares `resources: sticky="<template>"`. Its declaration is
checked for the whole DAG before any job runs, the template's workers are started right away, and
each sticky job becomes one invocation on a worker holding the template. Snakemake's own
post-processing checks the outputs afterwards, as for any job.
"""

from __future__ import annotations

import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from snakemake.executors.local import Executor as LocalExecutor
from snakemake_interface_common.exceptions import WorkflowError
from snakemake_interface_executor_plugins.executors.base import SubmittedJobInfo
from snakemake_interface_executor_plugins.executors.real import RealExecutor
from snakemake_interface_executor_plugins.jobs import JobExecutorInterface
from snakemake_interface_executor_plugins.settings import ExecMode

from .invocation import Invocation, InvocationResult, build_invocation, local_script_path
from .report import RunReport
from .settings import ExecutorSettings
from .templates import CONFIG_SECTION, RESOURCE, TemplateSpec, parse_templates

if TYPE_CHECKING:  # Dask loads with the engine, not whenever Snakemake lists its plugins
    from .backends.base import Backend


class Executor(RealExecutor):
    def __post_init__(self) -> None:
        self.settings: ExecutorSettings = self.workflow.executor_settings or ExecutorSettings()
        check_settings(self.settings)
        self.workdir = os.getcwd()
        self.templates = parse_templates(self.workflow.config, Path(self.workdir))
        self.local = LocalExecutor(self.workflow, self.logger)
        self._backend: Optional["Backend"] = None
        self._backend_lock = threading.Lock()
        self._cancelled = False
        self._errors = 0
        self._losses: dict[str, int] = {}
        self._stop_status = threading.Event()
        self._checked: dict[tuple[str, str], TemplateSpec] = {}
        self._scripts: dict[str, str] = {}
        # prepare, register and submit sticky jobs beside Snakemake's scheduler thread, in order
        self._dispatcher = ThreadPoolExecutor(1, thread_name_prefix="sticky-dispatch")
        self.report = RunReport(self.templates, Path(self.workflow.persistence.path) / "sticky", self.logger)
        used = self.templates_in_dag()
        try:
            for template in self.templates_ready_now(used):
                self.start_pool(template)
        except BaseException:
            # Snakemake never calls shutdown() for an executor that failed to start.
            self.close_backend()
            raise
        self.warn_if_cores_limit(used)

    # -- declarations -------------------------------------------------------------------------

    def templates_in_dag(self) -> dict[str, TemplateSpec]:
        """Check every sticky job that will run; return the templates they use."""
        used = {}
        for job in self.dag.needrun_jobs():
            template = self.template_for(job)
            if template is not None:
                used[template.name] = template
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
        slots = sum(self.backend.workers_for(t) * t.slots for t in used.values()) if used else 0
        cores = self.workflow.resource_settings.cores
        if cores is not None and slots > cores:
            self.logger.warning(
                f"Sticky workers offer {slots} invocation slots but --cores {cores} lets Snakemake "
                f"run at most {cores} jobs at once; raise --cores to keep every worker busy."
            )

    # -- engine -------------------------------------------------------------------------------

    @property
    def backend(self) -> "Backend":
        with self._backend_lock:
            if self._backend is None:
                from .backends.local import EmbeddedBackend

                self._backend = EmbeddedBackend(self.workdir, self.settings, self.logger, self.worker_event)
                if self.settings.status_interval > 0:
                    threading.Thread(target=self.log_status, name="sticky-status", daemon=True).start()
            return self._backend

    def start_pool(self, template: TemplateSpec) -> None:
        started = self.backend.start_pool(template)
        if started:
            self.report.workers_requested(template, started)

    def worker_event(self, message: dict) -> None:
        """Engine events: feed the report; replace workers of hung invocations; keep the loss budget."""
        lost = self.report.worker_event(message)
        if message.get("event") == "invocation-timeout":
            reason = (
                f"Invocation of rule '{message['rule']}' timed out after {message['timeout_s']:g} s "
                f"(--sticky-invocation-timeout, or the rule's runtime resource); its worker "
                f"{message['name']} is replaced, as the hung invocation cannot be stopped otherwise."
            )
            self.logger.warning(reason)
            self.report.expect_removal(message["address"])
            self.backend.abandon(message["key"], reason, message["address"])
        if lost is not None:
            losses = self._losses[lost.template] = self._losses.get(lost.template, 0) + 1
            if losses > self.settings.max_worker_losses:
                self.backend.fail_pool(
                    self.templates[lost.template],
                    f"Sticky template '{lost.template}' lost {losses} workers, more than "
                    f"--sticky-max-worker-losses {self.settings.max_worker_losses}; its invocations fail.",
                )

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

    # -- jobs ---------------------------------------------------------------------------------

    def run_job(self, job: JobExecutorInterface) -> None:
        if job.is_group():
            sticky = [j.rule.name for j in job if j.resources.get(RESOURCE) is not None]
            if sticky:
                raise WorkflowError(
                    f"Sticky rule(s) {', '.join(sticky)} cannot run in a pipe or service group."
                )
            self.local.run_job(job)
            return
        template = self.template_for(job)
        if template is None:
            self.local.run_job(job)
            return
        self.start_pool(template)
        self._dispatcher.submit(self.dispatch, job, template)

    def dispatch(self, job: JobExecutorInterface, template: TemplateSpec) -> None:
        """Prepare the job as the local executor does, mark it started, send it to a worker."""
        if self._cancelled:
            return
        job_info = SubmittedJobInfo(job=job)
        try:
            self.workflow.async_run(job.prepare())
            invocation = build_invocation(
                job, template, self.script_of(job), self.workflow.config, self.settings.invocation_timeout
            )
            job_info.external_jobid = invocation.key
            self.report_job_submission(job_info)
            self.report.invocation_submitted(invocation)
            self.backend.submit(invocation, partial(self.invocation_done, job_info))
        except Exception as e:
            self.report_job_error(job_info, msg=f"Sticky job could not be dispatched: {type(e).__name__}: {e}")

    def invocation_done(self, job_info: SubmittedJobInfo, invocation: Invocation, outcome: Any) -> None:
        self.report.invocation_finished(invocation, outcome)
        if self._cancelled:
            return  # Ctrl-C: Snakemake is already tearing down, as with the local executor
        if not isinstance(outcome, InvocationResult):
            hint = (
                f" It was caught in more than --sticky-max-worker-losses "
                f"({self.settings.max_worker_losses}) lost workers."
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
        else:
            self.report_job_error(
                job_info,
                msg=f"Sticky invocation failed on worker {outcome.worker} "
                f"(template '{invocation.template}', pid {outcome.pid}):\n{outcome.error}",
            )

    def handle_job_error(self, job: JobExecutorInterface) -> None:
        self._errors += 1

    def shutdown(self) -> None:
        self._dispatcher.shutdown(wait=True)
        try:
            self.local.shutdown()
        finally:
            self.close_backend("failed" if self._errors else "success")

    def cancel(self) -> None:
        self._cancelled = True
        self._dispatcher.shutdown(wait=False, cancel_futures=True)
        try:
            self.local.cancel()
        finally:
            self.close_backend("cancelled", cancel=True)

    # -- RealExecutor -------------------------------------------------------------------------

    @property
    def cores(self) -> Optional[int]:
        return self.workflow.resource_settings.cores

    def get_exec_mode(self) -> ExecMode:
        return ExecMode.SUBPROCESS

    def get_python_executable(self) -> str:
        return sys.executable


def body_kind(job: JobExecutorInterface) -> str:
    for kind in ("shell", "notebook", "wrapper", "cwl", "template_engine", "norun"):
        if getattr(job, f"is_{kind}", False):
            return {"norun": "empty (no run/shell/script)"}.get(kind, f"{kind}:")
    return "run:"


def check_settings(settings: ExecutorSettings) -> None:
    if settings.workers is not None and settings.workers < 1:
        raise WorkflowError(f"--sticky-workers must be at least 1, got {settings.workers}.")
    if settings.setup_attempts < 1:
        raise WorkflowError(f"--sticky-setup-attempts must be at least 1, got {settings.setup_attempts}.")
    if settings.max_worker_losses < 0:
        raise WorkflowError(f"--sticky-max-worker-losses must not be negative, got {settings.max_worker_losses}.")
    if settings.invocation_timeout is not None and settings.invocation_timeout <= 0:
        raise WorkflowError(f"--sticky-invocation-timeout must be positive, got {settings.invocation_timeout}.")
    if settings.preempt_grace < 0:
        raise WorkflowError(f"--sticky-preempt-grace must not be negative, got {settings.preempt_grace}.")
    if settings.status_interval < 0:
        raise WorkflowError(f"--sticky-status-interval must not be negative, got {settings.status_interval}.")
    if settings.setup_retry_delay < 0:
        raise WorkflowError(f"--sticky-setup-retry-delay must not be negative, got {settings.setup_retry_delay}.")
