"""Embedded engine: a Dask scheduler inside the Snakemake process, listening on loopback only,
and Nanny-supervised worker processes, one per GPU (or one CPU worker), per template.

Scheduler and Nannies live on one event loop in a thread of the Snakemake process; the Nannies
start the worker processes (forked from a clean forkserver, never from this process: see
forkserver.py) and restart one that dies. Worker processes watch their Nanny and exit when it
goes away, so nothing outlives Snakemake. Every connection is TLS with the run's credentials
(security.py), loopback included: other users of the machine can reach loopback ports too.

A template with its own software environment (environments.py) cannot be forked from this
Python: its workers are processes of that environment's Python, supervised here (env_workers.py).
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import signal
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional, Union

from distributed import Nanny

from ...settings import ExecutorSettings
from ...templates import TemplateSpec
from ...wire import EVENT_TOPIC, WorkerExited, worker_name
from ...worker.voucher import VOUCH_S, alive
from .. import forkserver
from ..gpus import GpuPlan, visible_gpus
from ..process_changes import ProcessChanges
from ..run_folders import RunFolder, clean_stale_runs
from ..security import run_credentials, write_credentials
from .base import OnEvent, worker_plugin
from .env_workers import Closed, EnvWorker
from .hosted import LOOPBACK, HostedScheduler, worker_close_s

RELEASE_WAIT_S = 2
START_ATTEMPTS = 3
Supervisor = Union[Nanny, EnvWorker]  # what keeps one worker process alive


class StickyNanny(Nanny):
    """A Nanny that says how its worker process ended (its exit status or signal), so that a
    crash is reported with its cause. It lives beside the scheduler, in this process, and hands
    the event to it directly: `Nanny.log_event` would open a TLS connection in a background task
    that a retiring Nanny's close cuts mid-handshake (a warning of a failed handshake)."""

    def __init__(self, *args: Any, on_exit: Callable[[str, int], None], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._report_exit = on_exit

    async def _on_worker_exit(self, exitcode: int) -> None:
        address = getattr(self.process, "worker_address", None)
        if address:
            self._report_exit(address, exitcode)
        await super()._on_worker_exit(exitcode)


class EmbeddedBackend(HostedScheduler):
    """Scheduler in this process on 127.0.0.1, Nanny workers as child processes."""

    replaces_hung_workers = True

    def __init__(self, workdir: str, settings: ExecutorSettings, log: Any, on_event: OnEvent, changes: ProcessChanges):
        self.workdir = workdir
        self.gpu_plan = GpuPlan(visible_gpus(), log)
        self.forked = forkserver.available()
        if self.forked:
            changes.on_undo(forkserver.start_forkserver())  # running already: the executor started it
            changes.dask_config({"distributed.worker.multiprocessing-method": "forkserver"})
        else:
            changes.on_undo(forkserver.skip_snakemake_cli_in_children())
        self._pools: dict[str, list[Supervisor]] = {}
        self._pool_gpus: dict[str, list[str]] = {}  # GPU ids taken by each pool's workers
        self._retiring: list[Any] = []  # futures of pools closing before the run ends
        self._retired: list[Supervisor] = []  # their Nannies
        # GPU id -> (template, future) of a retiring pool whose worker on that GPU is closing
        self._freeing: dict[str, tuple[str, Any]] = {}
        self._dashboard_attached = False
        # for workers in their own environment: the run's folder (credentials as files) and a
        # pipe whose closing tells their supervisors that this process is gone
        self._env_run: Optional[RunFolder] = None
        self._watch_pipe: tuple[int, int] = (-1, -1)
        super().__init__(settings, log, on_event, security=run_credentials(), changes=changes)
        self._vouching = asyncio.run_coroutine_threadsafe(self._vouch_for_workers(), self._loop)
        # Runs before multiprocessing's own exit handler, which would wait for every worker.
        atexit.register(self.kill_workers)

    def workers_for(self, template: TemplateSpec) -> int:
        """The template's workers: its `workers:`, --sticky-workers, or one per its GPUs."""
        return self.gpu_plan.worker_count(template, self.settings.workers)

    def start_pool(self, template: TemplateSpec) -> int:
        """Start the template's workers unless they run (returns how many it started)."""
        if template.identity in self._pools:
            return 0
        count = self.workers_for(template)
        if template.launch:
            # Workers in their own environment start as commands: they read the run's credentials
            # from files, and get the template's worker plugin from the scheduler.
            if self._env_run is None:
                self._start_env_workers()
            self.client.register_plugin(
                worker_plugin(template, self.workdir, self.settings, owned=True, endpoint_key=self.endpoint_key)
            )
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
            self.fail_pool(
                template,
                f"Sticky template '{template.name}': worker {index + 1} could not start: {type(e).__name__}: {e}",
            )

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

    def _start_env_workers(self) -> None:
        """What workers in their own environment need: the run's credentials as files, in a
        folder that the next run here removes should this one die, and the watched pipe."""
        runs = Path(self.workdir, ".snakemake", "sticky", "runs")
        clean_stale_runs(runs, self.log)
        self._env_run = RunFolder.create(runs, "local", "")
        write_credentials(self.security, self._env_run.credentials)
        self._watch_pipe = os.pipe()  # neither end is inherited unless passed on

    async def _start_nanny(self, template: TemplateSpec, index: int, gpus: list[str]) -> None:
        pool = self._pools[template.identity]
        failure: Optional[Exception] = None
        for attempt in range(1, START_ATTEMPTS + 1):
            if self._pools.get(template.identity) is not pool:
                return  # retired meanwhile
            nanny = self._nanny(template, index, gpus)
            pool.append(nanny)
            try:
                await nanny
                return
            except Closed:
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

    def _nanny(self, template: TemplateSpec, index: int, gpus: list[str]) -> Supervisor:
        if template.launch:
            assert self._env_run is not None
            return EnvWorker(
                template,
                index,
                gpus,
                self._scheduler.address,
                self._env_run.credentials,
                self._watch_pipe[0],
                self._joined,
                self._worker_exit,
                self.log,
            )
        plugin = worker_plugin(template, self.workdir, self.settings, owned=True, endpoint_key=self.endpoint_key)
        nanny = StickyNanny(
            self._scheduler.address,
            security=self.security,
            name=worker_name(template.name, index),
            host=LOOPBACK,
            nthreads=template.slots,
            resources={template.tag: template.slots},
            # GPU ids are pinned before the worker process imports anything of the template;
            # a CPU template sees no GPU at all.
            env={"CUDA_VISIBLE_DEVICES": ",".join(gpus)},
            plugins={plugin},
            on_exit=self._worker_exit,
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

    def _joined(self, name: str) -> Optional[str]:
        """The address of the scheduler's worker of that name, once it has joined."""
        return next((ws.address for ws in list(self._scheduler.workers.values()) if ws.name == name), None)

    def _worker_exit(self, address: str, exitcode: int) -> None:
        """A supervisor saw its worker process end: the scheduler logs it for the run."""
        self._scheduler.log_event(EVENT_TOPIC, WorkerExited(address=address, exitcode=exitcode).to_message())

    def replace_worker(self, worker: str) -> None:
        """Restart the worker process through its Nanny (or kill it, and its supervisor starts
        it again); it builds the state anew."""
        for supervisor in self._supervisors():
            if isinstance(supervisor, EnvWorker) and supervisor.address == worker:
                self._loop.call_soon_threadsafe(supervisor.kill_worker)
                return
        ws = self._scheduler.workers.get(worker)
        if ws is not None and ws.nanny is None:  # a worker in its own environment, replaced already
            self._loop.call_soon_threadsafe(self._scheduler.close_worker, worker)
            return
        self.client.restart_workers([worker], raise_for_error=False)

    def _supervisors(self) -> list[Supervisor]:
        return [n for pool in list(self._pools.values()) for n in list(pool)] + list(self._retired)

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

    async def _retire(self, template: TemplateSpec, pool: list[Supervisor]) -> None:
        # Results are fetched before the last job is reported done and released just now; the
        # scheduler learns of the release a moment later. Until then it would count them lost
        # with the workers (and say so in a warning).
        deadline = time.monotonic() + RELEASE_WAIT_S
        while any(template.tag in (ts.resource_restrictions or {}) for ts in self._scheduler.tasks.values()):
            if time.monotonic() >= deadline:
                self.log.warning(
                    f"Sticky template '{template.name}': the Dask scheduler still held tasks of its retiring "
                    f"workers after {RELEASE_WAIT_S} s; Dask may report them lost as the workers close."
                )
                break
            await asyncio.sleep(0.01)
        await self._close_nannies(pool)

    async def _vouch_for_workers(self) -> None:
        """A Nanny is a process of its own beside its worker: once a second, each worker process
        that is alive and not stopped is vouched for, as a supervisor vouches for a batch-job
        worker (worker/voucher.py), so a step that holds the worker's interpreter lock is not taken
        for a lost worker. Workers in their own environment have their supervisor's word."""
        while True:
            await asyncio.sleep(VOUCH_S)
            now = time.time()
            for nanny in self._supervisors():
                process = getattr(nanny, "process", None)
                pid, address = getattr(process, "pid", None), getattr(process, "worker_address", None)
                ws = self._scheduler.workers.get(address) if isinstance(nanny, Nanny) and address else None
                if ws is not None and pid and alive(pid):
                    ws.last_seen = now

    async def _close_workers(self) -> None:
        self._vouching.cancel()
        await self._close_nannies([n for pool in self._pools.values() for n in pool])
        await asyncio.gather(*(asyncio.wrap_future(f) for f in self._retiring), return_exceptions=True)
        atexit.unregister(self.kill_workers)
        self._end_run()

    def _end_run(self) -> None:
        """The credentials' folder goes, and the watched pipe closes (no supervisor is left)."""
        if self._env_run is not None:
            self._env_run.remove()
            self._env_run = None
        for fd in self._watch_pipe:
            if fd >= 0:
                os.close(fd)
        self._watch_pipe = (-1, -1)

    def kill_workers(self) -> None:
        """Snakemake exits without having closed the workers (a second Ctrl-C, a crash): kill
        them, or the interpreter's exit would wait for each to finish its teardown. The
        forkserver then kills what their templates started."""
        for nanny in self._supervisors():
            if isinstance(nanny, EnvWorker):
                nanny.kill()  # its supervisor ends the rest and exits
                continue
            pid = getattr(nanny.process, "pid", None)
            if pid:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self._end_run()

    async def _close_nannies(self, nannies: list[Supervisor]) -> None:
        # A Nanny asks its worker to close and kills it (SIGKILL) after 0.8 of the timeout.
        timeout = worker_close_s(self.settings) / 0.8
        await asyncio.gather(
            *(
                n.close(timeout * 0.8, self._scheduler.close_worker) if isinstance(n, EnvWorker) else n.close(timeout)
                for n in nannies
            ),
            return_exceptions=True,
        )
