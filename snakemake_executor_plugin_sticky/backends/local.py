"""Embedded engine: a Dask scheduler inside the Snakemake process, listening on loopback only,
and Nanny-supervised worker processes, one per GPU (or one CPU worker), per template.

Scheduler and Nannies live on one event loop in a thread of the Snakemake process; the Nannies
start the worker processes (forked from a clean forkserver, never from this process: see
forkserver.py) and restart one that dies. Worker processes watch their Nanny and exit when it
goes away, so nothing outlives Snakemake. Every connection is TLS with the run's credentials
(security.py), loopback included: other users of the machine can reach loopback ports too.
"""

from __future__ import annotations

import asyncio
import atexit
import importlib.util
import logging
import os
import shutil
import signal
import subprocess
import threading
import traceback
from typing import Any, Coroutine, Optional

import dask
from distributed import Client, Nanny, Scheduler
from distributed.security import Security
from snakemake_interface_common.exceptions import WorkflowError

from .. import forkserver
from ..invocation import EVENT_TOPIC
from ..security import run_credentials
from ..settings import ExecutorSettings
from ..templates import TemplateSpec
from .base import DaskBackend, OnEvent, worker_plugin

LOOPBACK = "127.0.0.1"
CLOSE_TIMEOUT_S = 6.0
# A worker's own closing around its template's teardown, and its exit (see worker.py).
WORKER_EXIT_MARGIN_S = 4.0
RELEASE_WAIT_S = 2
START_ATTEMPTS = 3



def worker_close_s(settings: ExecutorSettings) -> float:
    """How long a worker may take to close: its template's teardown grace and a margin."""
    return settings.teardown_grace + WORKER_EXIT_MARGIN_S


def dashboard_available() -> bool:
    """Whether bokeh, which Dask's dashboard needs, is installed (found, not imported: that is slow)."""
    return importlib.util.find_spec("bokeh") is not None


def visible_gpus() -> list[str]:
    """GPU ids this process may use: CUDA_VISIBLE_DEVICES if set, else what nvidia-smi lists."""
    declared = os.environ.get("CUDA_VISIBLE_DEVICES")
    if declared is not None:
        return [g.strip() for g in declared.split(",") if g.strip() and g.strip() != "-1"]
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        listing = subprocess.run(
            [smi, "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in listing.splitlines() if line.strip()]


class GpuPlan:
    """Hands out GPU ids to workers, template after template, sharing only when asked for more,
    and takes them back from a retired pool."""

    def __init__(self, gpus: list[str], log: Any):
        self.gpus = gpus
        self.log = log
        self._users = {gpu: 0 for gpu in gpus}  # workers pinned to each GPU
        self._warned: set[str] = set()

    def worker_count(self, template: TemplateSpec, default_workers: Optional[int]) -> int:
        workers = template.workers or default_workers
        if workers is None:
            workers = max(1, len(self.gpus) // template.gpus) if template.gpus else 1
        needed = workers * template.gpus
        if needed > len(self.gpus):
            raise WorkflowError(
                f"Sticky template '{template.name}' asks for {workers} worker(s) x {template.gpus} "
                f"GPU(s), but {len(self.gpus)} GPU(s) are visible here "
                f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}). "
                f"Lower 'gpus:' or the number of workers, or run where the GPUs are."
            )
        return workers

    def take(self, template: TemplateSpec) -> list[str]:
        if not template.gpus:
            return []
        least_used = sorted(self.gpus, key=lambda gpu: (self._users[gpu], self.gpus.index(gpu)))
        taken = sorted(least_used[: template.gpus], key=self.gpus.index)
        if any(self._users[gpu] for gpu in taken) and template.name not in self._warned:
            self._warned.add(template.name)
            self.log.warning(
                f"Sticky template '{template.name}' shares GPUs with other templates: more GPUs "
                f"are asked for in total than the {len(self.gpus)} visible."
            )
        for gpu in taken:
            self._users[gpu] += 1
        return taken

    def release(self, gpus: list[str]) -> None:
        for gpu in gpus:
            self._users[gpu] -= 1


class HostedScheduler(DaskBackend):
    """A Dask scheduler on an event loop in a thread of the Snakemake process, and a client of it,
    both with the run's TLS credentials. Subclasses say where it listens (`host`) and how workers
    come to it."""

    host = LOOPBACK

    def __init__(self, settings: ExecutorSettings, log: Any, on_event: OnEvent, security: Security):
        super().__init__(on_event, crash_limit=settings.invocation_crashes)
        self.log = log
        self.settings = settings
        self.security = security
        self.dashboard = bool(settings.dashboard_address)
        if self.dashboard and not dashboard_available():
            log.warning(
                f"--sticky-dashboard-address {settings.dashboard_address}: the Dask dashboard needs "
                "bokeh (pip install bokeh); this run has none."
            )
            self.dashboard = False
        # Dask's own INFO chatter (comms, plugin registration) is noise in a Snakemake log.
        logging.getLogger("distributed").setLevel(logging.WARNING)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="sticky-engine", daemon=True)
        self._thread.start()
        self._scheduler: Scheduler = self._run(self._start_scheduler(), timeout=60)
        self._client = Client(self._scheduler.address, security=security, set_as_default=False, timeout="60s")
        self.watch_workers()

    @property
    def client(self) -> Client:
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
        # The plugin stops an invocation that crashes its workers itself (DaskBackend.worker_lost);
        # Dask's own limit, one above, is the safety net.
        dask.config.set({"distributed.scheduler.allowed-failures": self.settings.invocation_crashes})
        scheduler = Scheduler(
            host=self.host, port=0, protocol="tls", security=self.security,
            dashboard=False, dashboard_address=address,
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


class StickyNanny(Nanny):
    """A Nanny that says how its worker process ended (its exit status or signal), so that a
    crash is reported with its cause."""

    async def _on_worker_exit(self, exitcode: int) -> None:
        address = getattr(self.process, "worker_address", None)
        if address:
            self.log_event(EVENT_TOPIC, {"event": "worker-exit", "address": address, "exitcode": exitcode})
        await super()._on_worker_exit(exitcode)


class EmbeddedBackend(HostedScheduler):
    """Scheduler in this process on 127.0.0.1, Nanny workers as child processes."""

    replaces_hung_workers = True

    def __init__(self, workdir: str, settings: ExecutorSettings, log: Any, on_event: OnEvent):
        self.workdir = workdir
        self.gpu_plan = GpuPlan(visible_gpus(), log)
        self.forked = forkserver.available()
        if self.forked:
            forkserver.start_forkserver()  # already running when the settings started it
            dask.config.set({"distributed.worker.multiprocessing-method": "forkserver"})
        else:
            forkserver.skip_snakemake_cli_in_children()
        self._pools: dict[str, list[Nanny]] = {}
        self._pool_gpus: dict[str, list[str]] = {}  # GPU ids taken by each pool's workers
        self._retiring: list[Any] = []  # futures of pools closing before the run ends
        self._retired: list[Nanny] = []  # their Nannies
        # GPU id -> (template, future) of a retiring pool whose worker on that GPU is closing
        self._freeing: dict[str, tuple[str, Any]] = {}
        self._dashboard_attached = False
        super().__init__(settings, log, on_event, security=run_credentials())
        # Runs before multiprocessing's own exit handler, which would wait for every worker.
        atexit.register(self.kill_workers)

    def workers_for(self, template: TemplateSpec) -> int:
        return self.gpu_plan.worker_count(template, self.settings.workers)

    def start_pool(self, template: TemplateSpec) -> int:
        if template.identity in self._pools:
            return 0
        count = self.workers_for(template)
        self._pools[template.identity] = []
        starting = []
        self._pool_gpus[template.identity] = []
        for index in range(count):
            gpus = self.gpu_plan.take(template)
            self._pool_gpus[template.identity] += gpus
            self.log.info(
                f"Sticky template '{template.name}': starting worker {index + 1}/{count}"
                + (f" on GPU(s) {','.join(gpus)}." if gpus else ".")
            )
            starting.append(asyncio.run_coroutine_threadsafe(self._start_worker(template, index, gpus), self._loop))
        if self.dashboard and not self._dashboard_attached:  # with the first pool, not with each
            self._dashboard_attached = True
            asyncio.run_coroutine_threadsafe(
                self._attach_dashboard([asyncio.wrap_future(f, loop=self._loop) for f in starting]), self._loop
            )
        return count

    async def _start_worker(self, template: TemplateSpec, index: int, gpus: list[str]) -> None:
        """Start one Nanny (which keeps its worker process alive), retrying a failed start; on
        a GPU that a retiring worker still holds, only once that worker and its processes are gone.
        Whatever fails here fails the pool with the cause: nobody waits on this coroutine."""
        try:
            await self._wait_for_gpus(template, index, gpus)
            await self._start_nanny(template, index, gpus)
        except Exception as e:
            traceback.print_exc()
            self.fail_pool(template, f"Sticky template '{template.name}': worker {index + 1} could not start: {type(e).__name__}: {e}")

    async def _wait_for_gpus(self, template: TemplateSpec, index: int, gpus: list[str]) -> None:
        waits = {}
        for gpu in gpus:
            name, future = self._freeing.get(gpu, ("", None))
            if future is not None and not future.done():
                waits[name] = future
        if waits:
            self.log.info(
                f"Sticky template '{template.name}': worker {index + 1} waits for GPU(s) {','.join(gpus)} "
                f"until the retiring workers of template(s) {', '.join(sorted(waits))} and their processes are gone."
            )
            await asyncio.gather(*(asyncio.wrap_future(f) for f in waits.values()), return_exceptions=True)

    async def _start_nanny(self, template: TemplateSpec, index: int, gpus: list[str]) -> None:
        pool = self._pools[template.identity]
        failure: Optional[Exception] = None
        for attempt in range(1, START_ATTEMPTS + 1):
            nanny = self._nanny(template, index, gpus)
            pool.append(nanny)
            try:
                await nanny
                return
            except Exception as e:
                pool.remove(nanny)
                self.log.warning(
                    f"Sticky template '{template.name}': worker {index} failed to start "
                    f"(attempt {attempt}/{START_ATTEMPTS}): {e}"
                )
                failure = e
                if attempt < START_ATTEMPTS:
                    await asyncio.sleep(attempt)
        if not pool:
            self.fail_pool(template, f"No worker of sticky template '{template.name}' could start: {failure}")

    def _nanny(self, template: TemplateSpec, index: int, gpus: list[str]) -> Nanny:
        plugin = worker_plugin(template, self.workdir, self.settings, owned=True)
        nanny = StickyNanny(
            self._scheduler.address,
            security=self.security,
            name=f"{template.name}-{index}",
            host=LOOPBACK,
            nthreads=template.slots,
            resources={template.tag: template.slots},
            # GPU ids are pinned before the worker process imports anything of the template;
            # a CPU template sees no GPU at all.
            env={"CUDA_VISIBLE_DEVICES": ",".join(gpus)},
            plugins={plugin},
            memory_limit=0,  # a resident model is meant to stay: no pausing, spilling or killing
            dashboard=False,
            silence_logs=logging.WARNING,
        )
        if self.forked:
            # A spawning Nanny sets Dask's pre-spawn environment (malloc trimming, one BLAS thread,
            # a hash seed) in this process before each start, and every job that is not sticky
            # would inherit it. The forkserver holds it already: this process keeps the user's.
            nanny.pre_spawn_env = {}
        return nanny

    def replace_worker(self, worker: str) -> None:
        self.client.restart_workers([worker], raise_for_error=False)

    def retire_pool(self, template: TemplateSpec) -> int:
        """End the template's workers now (each runs its teardown), without waiting for them;
        their GPUs go back to the plan. An invocation that comes later starts a new pool."""
        pool = self._pools.pop(template.identity, None)
        if not pool:
            return 0
        gpus = self._pool_gpus.pop(template.identity, [])
        self.gpu_plan.release(gpus)
        self.release_spent()
        self._retired += pool
        retiring = asyncio.run_coroutine_threadsafe(self._retire(template, pool), self._loop)
        self._retiring.append(retiring)
        self._freeing.update({gpu: (template.name, retiring) for gpu in gpus})
        return len(pool)

    async def _retire(self, template: TemplateSpec, pool: list[Nanny]) -> None:
        # Results are fetched before the last job is reported done and released just now; the
        # scheduler learns of the release a moment later. Until then it would count them lost
        # with the workers (and say so in a warning).
        for _ in range(RELEASE_WAIT_S * 100):
            if not any(template.tag in (ts.resource_restrictions or {}) for ts in self._scheduler.tasks.values()):
                break
            await asyncio.sleep(0.01)
        await self._close_nannies(pool)

    async def _close_workers(self) -> None:
        await self._close_nannies([n for pool in self._pools.values() for n in pool])
        await asyncio.gather(*(asyncio.wrap_future(f) for f in self._retiring), return_exceptions=True)
        atexit.unregister(self.kill_workers)

    def kill_workers(self) -> None:
        """Snakemake exits without having closed the workers (a second Ctrl-C, a crash): kill
        them, or the interpreter's exit would wait for each to finish its teardown. The
        forkserver then kills what their templates started."""
        for nanny in [n for pool in self._pools.values() for n in pool] + self._retired:
            pid = getattr(nanny.process, "pid", None)
            if pid:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    async def _close_nannies(self, nannies: list[Nanny]) -> None:
        # A Nanny asks its worker to close and kills it (SIGKILL) after 0.8 of the timeout.
        timeout = worker_close_s(self.settings) / 0.8
        await asyncio.gather(*(n.close(timeout=timeout) for n in nannies), return_exceptions=True)
