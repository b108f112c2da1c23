"""Attach mode: an existing Dask scheduler, with workers the user starts (opportunistic nodes,
a long-lived pool). The run registers each template's worker plugin with the scheduler, so every
worker that offers the template's tag builds the state, and unregisters it at the end, which
tears the state down; the workers and the scheduler stay as they were.
"""

from __future__ import annotations

import os
from typing import Any

from distributed import Client
from snakemake_interface_common.exceptions import WorkflowError

from ..settings import ExecutorSettings
from ..templates import TemplateSpec
from .base import DaskBackend, OnEvent, worker_plugin

CLOSE_TIMEOUT_S = 10.0


def worker_command(address: str, template: TemplateSpec) -> str:
    """The command line that makes a machine one of the template's workers."""
    return (
        f"dask worker {address} --resources {template.tag}={template.slots} "
        f"--nthreads {template.slots} --memory-limit 0 --no-nanny"
    )


class AttachedBackend(DaskBackend):
    """A client of a scheduler that is not ours: plugins in, invocations through, nothing owned."""

    def __init__(self, workdir: str, settings: ExecutorSettings, log: Any, on_event: OnEvent):
        super().__init__(on_event, crash_limit=settings.invocation_crashes)
        self.workdir = workdir
        self.settings = settings
        self.log = log
        self._plugins: dict[str, str] = {}
        target = settings.scheduler or ""
        by_file = os.path.isfile(target)
        try:
            # Security (TLS files) comes from Dask's config, as for any Dask client.
            self._client = (
                Client(scheduler_file=target, set_as_default=False, timeout="30s")
                if by_file
                else Client(target, set_as_default=False, timeout="30s")
            )
        except Exception as e:
            raise WorkflowError(
                f"--sticky-scheduler {target}: cannot connect to the Dask scheduler "
                f"({type(e).__name__}: {e}). Give its address (tls://host:8786) or scheduler file, "
                "and its TLS credentials in Dask's config (distributed.comm.tls.*)."
            ) from e
        self.address = self._client.scheduler.address
        self.watch_workers()

    @property
    def client(self) -> Client:
        return self._client

    def workers_for(self, template: TemplateSpec) -> int:
        holders = [w for w in self._client.scheduler_info(n_workers=-1)["workers"].values()
                   if template.tag in (w.get("resources") or {})]
        return max(1, len(holders))

    def start_pool(self, template: TemplateSpec) -> int:
        if template.identity in self._plugins:
            return 0
        plugin = worker_plugin(template, self.workdir, self.settings, owned=False)
        self._client.register_plugin(plugin)
        self._plugins[template.identity] = plugin.name
        self.log.info(
            f"Sticky template '{template.name}' runs on the workers of {self.address} that offer "
            f"'{template.tag}'. Add one with: {worker_command(self.address, template)}"
        )
        return 0

    def close(self) -> None:
        self.close_events()
        try:
            for name in self._plugins.values():
                try:
                    self._client.unregister_worker_plugin(name)
                except Exception as e:  # not registered anywhere any more: nothing to tear down
                    self.log.warning(f"Sticky: unregistering worker plugin {name} failed: {e}")
        finally:
            self._client.close(timeout=CLOSE_TIMEOUT_S)
