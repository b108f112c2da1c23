"""Jobs that are not sticky: Snakemake's local executor, or another executor plugin
(--sticky-other-executor) with its own settings.

Snakemake runs `localrules` on the head node whatever the executor; so does this: they go to the
local executor even when another executor takes the other jobs. The other executor sees the
workflow as it would under `--executor NAME`: its own settings and its own common settings (which
decide, for one, how it writes the command of each job). Job errors and successes reach the
executor that ran the job.
"""

from __future__ import annotations

import shlex
import sys
from typing import Any, Optional

from snakemake.executors.local import Executor as LocalExecutor
from snakemake_interface_common.exceptions import WorkflowError
from snakemake_interface_executor_plugins.jobs import JobExecutorInterface

from ..settings import ExecutorSettings


class WorkflowView:
    """The workflow as another executor plugin must see it: its own plugin and settings."""

    def __init__(self, workflow: Any, plugin: Any, executor_settings: Any):
        self._workflow = workflow
        self.executor_plugin = plugin
        self.executor_settings = executor_settings

    def __getattr__(self, name: str) -> Any:
        return getattr(self._workflow, name)


class Delegate:
    """Runs what is not sticky, on the local executor or the other executor."""

    def __init__(self, workflow: Any, logger: Any, settings: ExecutorSettings):
        self.workflow = workflow
        self.local = LocalExecutor(workflow, logger)
        self.other: Optional[Any] = None
        name = settings.other_executor
        if name:
            plugin = other_plugin(name)
            view = WorkflowView(workflow, plugin, other_settings(plugin, settings.other_executor_args))
            self.other = plugin.executor(view, logger)
            logger.info(f"Jobs that are not sticky go to the '{name}' executor; localrules run here.")

    def executor_of(self, job: JobExecutorInterface) -> Any:
        """The executor that runs the job: the local one for localrules, else the other."""
        if self.other is None or on_the_head_node(job, self.workflow):
            return self.local
        return self.other

    def run_job(self, job: JobExecutorInterface) -> None:
        """Run a job that is not sticky."""
        self.executor_of(job).run_job(job)

    def handle_job_success(self, job: JobExecutorInterface) -> None:
        """Hand a success on to the executor that ran the job."""
        self.executor_of(job).handle_job_success(job)

    def handle_job_error(self, job: JobExecutorInterface) -> None:
        """Hand an error on to the executor that ran the job."""
        self.executor_of(job).handle_job_error(job)

    def shutdown(self) -> None:
        """Wait for the jobs of both executors, then end them."""
        try:
            if self.other is not None:
                self.other.shutdown()
        finally:
            self.local.shutdown()

    def cancel(self) -> None:
        """Cancel the jobs of both executors."""
        try:
            if self.other is not None:
                self.other.cancel()
        finally:
            self.local.cancel()


def on_the_head_node(job: JobExecutorInterface, workflow: Any) -> bool:
    """Whether Snakemake would run the job on the head node beside a cluster executor: a rule of
    `localrules`, one with no body, or a template rule. (`job.is_local` cannot tell: under this
    executor, which runs on the head node itself, every job counts as local.)"""
    jobs = list(job) if job.is_group() else [job]
    return any(
        j.rule.group is None and (j.rule.name in workflow._localrules or j.rule.norun or j.rule.is_template_engine)
        for j in jobs
    )


def other_plugin(name: str) -> Any:
    """The installed executor plugin named by --sticky-other-executor."""
    from snakemake_interface_executor_plugins.registry import ExecutorPluginRegistry

    registry = ExecutorPluginRegistry()
    if name == "sticky" or not registry.is_installed(name):
        raise WorkflowError(
            f"--sticky-other-executor {name}: no such executor plugin is installed "
            f"(pip install snakemake-executor-plugin-{name}), or it is this one."
        )
    return registry.get_plugin(name)


def other_settings(plugin: Any, own_args: Optional[str]) -> Any:
    """The other executor's settings: from --sticky-other-executor-args when given (runs driven
    from Python), else from Snakemake's command line, where its --NAME-* flags are given as for
    `--executor NAME`; its defaults when Snakemake runs without its command line."""
    if plugin.settings_cls is None:
        return None
    where = "--sticky-other-executor-args" if own_args is not None else "this command line"
    try:
        if own_args is not None:
            args = parse_plugin_args(plugin, shlex.split(own_args))
        else:
            args = snakemake_command_line()
            if args is None:
                args = parse_plugin_args(plugin, [])
        return plugin.get_settings(args)
    except (Exception, SystemExit) as e:
        raise WorkflowError(
            f"--sticky-other-executor {plugin.name}: its --{plugin.name}-* settings could not be read "
            f"from {where} ({type(e).__name__}: {e})."
        ) from e


def snakemake_command_line() -> Optional[Any]:
    """Snakemake's parsed command line, if this process runs Snakemake's CLI for this executor."""
    from snakemake.cli import parse_args

    try:
        _, args = parse_args(sys.argv[1:])
    except (Exception, SystemExit):
        return None
    return args if getattr(args, "executor", None) == "sticky" else None


def parse_plugin_args(plugin: Any, argv: list[str]) -> Any:
    """The plugin's settings from flags of its own, with its environment variables."""
    import configargparse

    parser = configargparse.ArgumentParser(prog=f"--sticky-other-executor-args for {plugin.name}")
    plugin.register_cli_args(parser, "executor")
    return parser.parse_args(argv)
