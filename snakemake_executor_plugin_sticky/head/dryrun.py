"""A dry run (`snakemake -n --executor sticky`) refuses what the real run refuses.

Snakemake runs a dry run with its own dry-run executor and never asks this plugin's `Executor`.
It reads this plugin's common settings, though, as it starts the run, once the Snakefile is
parsed and before the DAG is built. There the run's workflow is found, and the dry-run executor
it is about to make is given the check that a real run makes before any worker starts
(declarations.check_declarations), once the DAG is there.

This module stays light: Snakemake imports it whenever it lists executors.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any, Callable

from snakemake_interface_executor_plugins.settings import CommonSettings


class StickyCommonSettings(CommonSettings):
    """The plugin's common settings; reading `implies_no_shared_fs`, which Snakemake does first
    as it starts a run, arms the dry run's check."""

    @property  # type: ignore[override]
    def implies_no_shared_fs(self) -> bool:
        """As Snakemake's local executor: False (and, in a dry run, the check is armed)."""
        arm_dry_run_check()
        return self.__dict__["_implies_no_shared_fs"]

    @implies_no_shared_fs.setter
    def implies_no_shared_fs(self, value: bool) -> None:
        self.__dict__["_implies_no_shared_fs"] = value


def arm_dry_run_check() -> None:
    """In a dry run of this executor, have the dry-run executor check the sticky declarations."""
    frame = sys._getframe(2)
    while frame is not None:
        scope = frame.f_locals
        starting = scope.get("self")
        if "pseudo_executor" in scope and hasattr(starting, "workflow_api"):
            if scope["pseudo_executor"] == "dryrun":
                arm(starting.workflow_api._workflow, scope.get("executor_settings"))
            return
        frame = frame.f_back


def arm(workflow: Any, settings: Any) -> None:
    """Wrap the workflow's `execute` (once) so that its dry-run executor checks the DAG's jobs."""
    if getattr(workflow, "_sticky_dry_run_checked", False):
        return
    workflow._sticky_dry_run_checked = True
    execute = workflow.execute

    def checked_execute(*args: Any, **kwargs: Any) -> Any:
        plugin = kwargs.get("executor_plugin")
        if plugin is not None:
            kwargs["executor_plugin"] = checking(plugin, lambda: check(workflow, settings))
        return execute(*args, **kwargs)

    workflow.execute = checked_execute


def checking(plugin: Any, check_first: Callable[[], None]) -> Any:
    """The executor plugin whose executor runs `check_first` before it is made."""

    class Checked(plugin.executor):  # type: ignore[misc, name-defined]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            check_first()
            super().__init__(*args, **kwargs)

    Checked.__name__ = Checked.__qualname__ = plugin.executor.__name__
    return dataclasses.replace(plugin, executor=Checked)


def check(workflow: Any, settings: Any) -> None:
    """The real run's check before any worker starts, on the DAG the dry run built; then the
    forecast of each template's part of the run (forecast.py)."""
    from snakemake.logging import logger

    from ..settings import ExecutorSettings
    from .declarations import check_declarations
    from .forecast import lines
    from .history import forecasts_for

    settings = settings or ExecutorSettings()
    jobs = list(workflow.dag.needrun_jobs())
    _, used, _ = check_declarations(workflow, jobs, settings)
    for forecast in forecasts_for(jobs, used, settings, Path.cwd()):
        for line in lines(forecast):
            logger.info(line)
