"""A Dask scheduler hosted in the Snakemake process, on an event loop in a thread of its own, and
a client of it, both with the run's TLS credentials. The embedded engine (local.py) listens on
loopback and starts Nanny workers; the batch-job engine (jobqueue.py) listens on the network and
submits jobs."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import threading
from typing import Any, Coroutine, Optional

from distributed import Client, Scheduler
from distributed.security import Security

from ...settings import ExecutorSettings
from ..process_changes import ProcessChanges
from .base import DaskBackend, OnEvent

LOOPBACK = "127.0.0.1"
CLOSE_TIMEOUT_S = 6.0
# A worker's own closing around its template's teardown, and its exit (see worker.py).
WORKER_EXIT_MARGIN_S = 4.0


def worker_close_s(settings: ExecutorSettings) -> float:
    """How long a worker may take to close: its template's teardown grace and a margin."""
    return settings.teardown_grace + WORKER_EXIT_MARGIN_S


def dashboard_available() -> bool:
    """Whether bokeh, which Dask's dashboard needs, is installed (found, not imported: that is slow)."""
    return importlib.util.find_spec("bokeh") is not None


class HostedScheduler(DaskBackend):
    """A Dask scheduler on an event loop in a thread of the Snakemake process, and a client of it,
    both with the run's TLS credentials. Subclasses say where it listens (`host`) and how workers
    come to it."""

    host = LOOPBACK
    worker_ttl: Optional[float] = None  # seconds between checks of workers' heartbeats; None: Dask's

    def __init__(
        self, settings: ExecutorSettings, log: Any, on_event: OnEvent, security: Security, changes: ProcessChanges
    ):
        super().__init__(on_event, crash_limit=settings.invocation_crashes)
        self.log = log
        self.settings = settings
        self.security = security
        self.changes = changes
        self.dashboard = bool(settings.dashboard_address)
        if self.dashboard and not dashboard_available():
            log.warning(
                f"--sticky-dashboard-address {settings.dashboard_address}: the Dask dashboard needs "
                "bokeh (pip install bokeh); this run has none."
            )
            self.dashboard = False
        # Dask's own INFO chatter (comms, plugin registration) is noise in a Snakemake log.
        changes.logger_level("distributed", logging.WARNING)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="sticky-engine", daemon=True)
        self._thread.start()
        self._scheduler: Scheduler = self._run(self._start_scheduler(), timeout=60)
        self._client = Client(self._scheduler.address, security=security, set_as_default=False, timeout="60s")
        self.watch_workers()

    @property
    def client(self) -> Client:
        """The client of the hosted scheduler."""
        return self._client

    def _run(self, coroutine: Coroutine[Any, Any, Any], timeout: float) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    async def _start_scheduler(self) -> Scheduler:
        address = self.settings.dashboard_address if self.dashboard else f"{LOOPBACK}:0"
        if self.dashboard:
            self.log.warning(
                f"The Dask dashboard listens on {address} without authentication: anyone who reaches "
                "it can watch this run (but not send it work). Keep it on 127.0.0.1 and use an SSH tunnel."
            )
        # A task that was running an invocation on a lost worker comes back to the plugin, which
        # stops an invocation that crashes its workers itself (scheduler_plugin.py, DaskBackend._lost);
        # Dask's own limit counts the losses of tasks that were only waiting on such workers.
        self.changes.dask_config({"distributed.scheduler.allowed-failures": self.settings.invocation_crashes})
        scheduler = Scheduler(
            host=self.host,
            port=0,
            protocol="tls",
            security=self.security,
            dashboard=False,
            dashboard_address=address,
            worker_ttl=self.worker_ttl,
        )
        await scheduler
        if not self.dashboard:
            # Dask always serves HTTP (health, metrics, task and worker listings) with no
            # authentication: nothing of it is needed here, so nothing of it listens.
            scheduler.http_server.stop()
        return scheduler

    async def _attach_dashboard(self, starting: list[Any]) -> None:
        """Add the dashboard once the first workers started: loading bokeh takes about half a
        second, which would otherwise delay them."""
        await asyncio.gather(*starting, return_exceptions=True)
        try:
            import distributed.dashboard.scheduler as dashboard

            dashboard.connect(self._scheduler.http_application, self._scheduler.http_server, self._scheduler)
        except Exception as e:
            self.log.warning(f"The Dask dashboard could not start: {type(e).__name__}: {e}")
            return
        host = str(self.settings.dashboard_address).rsplit(":", 1)[0] or LOOPBACK
        self.log.info(f"Dask dashboard of the sticky workers: http://{host}:{self._scheduler.http_server.port}/status")

    def close(self) -> None:
        """End the workers, the client and the scheduler, each within its timeout."""
        self.close_events()
        try:
            self._client.close(timeout=CLOSE_TIMEOUT_S)
        finally:
            # a Nanny that asked its worker to close kills it after its timeout and waits as long again
            self._run(self._close_servers(), timeout=2 * worker_close_s(self.settings) / 0.8 + 4)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=2)

    async def _close_servers(self) -> None:
        await self._close_workers()
        await self._scheduler.close()

    async def _close_workers(self) -> None:
        """End every worker (each runs its teardown) before the scheduler goes."""
