"""Batch-job engine: the scheduler in the Snakemake process, listening on the network with TLS,
and each template's workers as batch jobs (one worker per job) submitted through dask-jobqueue.

Pools are elastic. A pool starts with no job; while invocations of its template wait, jobs are
added (one per `slots` outstanding invocations, up to the pool's `max-workers`); a worker idle for
`--sticky-idle-timeout` with nothing waiting is retired; a worker near its walltime retires
itself, letting its running invocations finish, and is replaced while work remains; a lost
worker's invocations go to another holder and the job is replaced. Every decision is logged.
Jobs run the worker without a Nanny, under the supervisor: the batch system supervises the job, and
the job ends when its worker does, with its status.

How each batch system's job is written and submitted is in batch_systems.py.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import math
import shlex
import socket
import subprocess
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from snakemake_interface_common.exceptions import WorkflowError

from ...settings import ExecutorSettings
from ...templates import TemplateSpec
from ...wire import JobStarted, worker_name
from ..fence import Fence
from ..process_changes import ProcessChanges
from ..run_folders import RunFolder, clean_stale_runs
from ..security import run_credentials, write_credentials
from .base import OnEvent, worker_plugin
from .batch_systems import (
    COMMAND_TIMEOUT_S,
    SYSTEMS,
    PoolSpec,
    cancel,
    check_pools,
    job_for,
    node_addresses,
    pools_of,
    submit,
)
from .hosted import HostedScheduler, worker_close_s

__all__ = ["BatchBackend", "check_pools", "network_host"]

SCALE_PERIOD_S = 1.0
STATUS_POLL_S = 15.0
FAILED_STARTS = 3  # jobs in a row that end before their worker connects: the pool fails
LEFT_JOB_GRACE_S = 10.0  # a job whose worker left unasked ends by itself within this, or is cancelled


def network_host(interface: Optional[str], nodes: Callable[[], Sequence[str]] = tuple) -> tuple[str, str]:
    """The address the workers reach this host at, and where it comes from: the interface's;
    else the one this host sends from to the first compute node it has a route to (`nodes`
    asks the batch system, only when no interface is named); else that of this host's name,
    which must not be a loopback address (a Debian hosts file maps the name to 127.0.1.1)."""
    if interface:
        from distributed.utils import get_ip_interface

        try:
            return get_ip_interface(interface), f"interface {interface} (--sticky-interface)"
        except ValueError as e:
            raise WorkflowError(f"--sticky-interface {interface}: {e} Interfaces here: {interfaces()}.") from e
    for node in nodes():
        source = route_source(node)
        if source is not None:
            return source, f"the route to compute node {node}; --sticky-interface chooses another"
    name = socket.getfqdn()
    try:
        address = socket.gethostbyname(name)
    except OSError:
        name = socket.gethostname()
        address = socket.gethostbyname(name)
    if ipaddress.ip_address(address).is_loopback:
        raise WorkflowError(
            f"The scheduler would listen on {address}, the address of this host's name {name!r} "
            f"(/etc/hosts), a loopback address that batch jobs on other nodes cannot reach. Name the "
            f"network interface the compute nodes reach this host through with --sticky-interface "
            f"(interfaces here: {interfaces()}); on a one-node cluster, --sticky-interface lo."
        )
    return address, f"this host's name {name!r}; --sticky-interface chooses another"


def route_source(node: str) -> Optional[str]:
    """The address this host sends from to the node (a UDP connect sends nothing), or None
    when there is no route to it."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((node, 9))
            return str(probe.getsockname()[0])
    except OSError:
        return None


def interfaces() -> str:
    """This host's network interfaces and their IPv4 addresses, for a message."""
    import psutil  # a dependency of distributed

    found = []
    for name, addresses in psutil.net_if_addrs().items():
        ipv4 = [a.address for a in addresses if a.family == socket.AF_INET]
        found.append(f"{name} {ipv4[0]}" if ipv4 else name)
    return ", ".join(found) or "none found"


@dataclass
class BatchJob:
    """One worker job: its dask-jobqueue Job, its template and pool, and what the scaler knows of it."""

    job: Any
    template: str
    pool: str
    submitted: float
    address: Optional[str] = None  # once its worker connected
    idle_since: Optional[float] = None
    ended: bool = False
    cancelled: bool = False


class BatchBackend(HostedScheduler):
    """Workers as batch jobs of one batch system; the scheduler here, TLS on the network."""

    replaces_hung_workers = True

    def __init__(self, workdir: str, settings: ExecutorSettings, log: Any, on_event: OnEvent, changes: ProcessChanges):
        self.workdir = workdir
        self.system = SYSTEMS[settings.cluster]
        self.run_dir = Path(workdir, ".snakemake", "sticky")
        self.host, self.host_origin = network_host(settings.interface, partial(node_addresses, self.system))
        # Dask checks heartbeats every worker_ttl and removes a worker unheard for longer: a
        # worker is given up between one and two worker_ttl after its last heartbeat.
        self.worker_ttl = settings.node_timeout / 2
        clean_stale_runs(self.run_dir / "runs", log)
        self.run = RunFolder.create(self.run_dir / "runs", self.system.name, self.system.job_class.cancel_command)
        self.credentials = self.run.credentials
        self.fence = Fence(self.run.path / "attempts")
        self.log_directory = str(self.run_dir / "jobs")
        self._templates: dict[str, TemplateSpec] = {}
        self._pools: dict[str, list[PoolSpec]] = {}
        self._jobs: list[BatchJob] = []
        self._failed_starts: dict[str, int] = {}
        self._names = itertools.count(1)
        self._closing = False
        self._last_poll = 0.0
        super().__init__(
            settings, log, on_event, security=write_credentials(run_credentials(), self.credentials), changes=changes
        )
        self._scaler = asyncio.run_coroutine_threadsafe(self._scale_forever(), self._loop)
        log.info(
            f"Sticky workers run as {self.system.name} jobs named sticky-<template>-{self.run.run_id}; "
            f"scheduler at {self._scheduler.address} (from {self.host_origin}; TLS, credentials of this run "
            f"in {self.credentials}); "
            f"job logs in {self.log_directory}."
        )

    def replace_worker(self, worker: str) -> None:
        """Close it: its job ends, and the pool submits another while work remains."""
        self._loop.call_soon_threadsafe(self._scheduler.close_worker, worker)

    def workers_for(self, template: TemplateSpec) -> int:
        """The template's workers at most: the sum of its pools' max-workers."""
        pools = self._pools.get(template.identity) or pools_of(template, self.settings)
        return sum(p.max_workers for p in pools)

    def start_pool(self, template: TemplateSpec) -> int:
        """Register the template's worker plugin; jobs start when its invocations wait."""
        if template.identity in self._templates:
            return 0
        pools = pools_of(template, self.settings)
        self._client.register_plugin(
            worker_plugin(template, self.workdir, self.settings, owned=True, endpoint_key=self.endpoint_key)
        )
        self._pools[template.identity] = pools
        self._templates[template.identity] = template
        return 0

    async def _scale_forever(self) -> None:
        failures = 0
        while not self._closing:
            try:
                await self._scale_once()
                failures = 0
            except Exception as e:
                failures += 1
                self.log.warning(f"Sticky scaling step failed ({failures}/{FAILED_STARTS}): {type(e).__name__}: {e}")
                if failures >= FAILED_STARTS:  # no endless retries: the run fails with the cause
                    for template in self._templates.values():
                        self.fail_pool(template, f"Sticky scaling of the worker jobs failed: {type(e).__name__}: {e}")
                    return
                await asyncio.sleep(5 * SCALE_PERIOD_S)
            await asyncio.sleep(SCALE_PERIOD_S)

    async def _scale_once(self) -> None:
        now = time.time()
        self._track_workers(now)
        await self._end_left_jobs()
        if now - self._last_poll >= STATUS_POLL_S:
            self._last_poll = now
            await self._poll_unconnected()
        for identity, template in list(self._templates.items()):
            if identity in self._failed_pools:
                continue
            outstanding = self.outstanding(identity)
            live = [j for j in self._jobs if j.template == identity and not j.ended]
            wanted = min(math.ceil(outstanding / template.slots), self.workers_for(template))
            if wanted > len(live):
                await self._add_jobs(template, wanted - len(live), outstanding, len(live))
            waiting = outstanding - self._running(identity)
            if waiting <= 0:
                await self._retire_idle(template, live, now)

    def _track_workers(self, now: float) -> None:
        """Match connected workers to their jobs (by name); a job whose worker left has ended."""
        by_name = {str(ws.name): ws for ws in self._scheduler.workers.values()}
        for job in self._jobs:
            if job.ended:
                continue
            ws = by_name.get(job.job.name)
            if ws is None:
                if job.address is not None:  # connected once, now gone: the job ends with it
                    job.ended = True
                continue
            if job.address is None:
                self._failed_starts[job.template] = 0
                self._job_started(job, now)
            job.address = ws.address
            job.idle_since = None if ws.processing else (job.idle_since or now)

    def _job_started(self, job: BatchJob, now: float) -> None:
        """Its worker joined: the run records how long the job waited in the queue."""
        template = self._templates[job.template]
        pool = next(p for p in self._pools[job.template] if p.name == job.pool)
        event = JobStarted(template.name, job.job.name, round(now - job.submitted, 3), pool.queue or "default", now)
        self._event_thread.submit(self._on_event, event)  # off the scheduler's loop, as worker events

    async def _end_left_jobs(self, final: bool = False) -> None:
        """The job of a worker that left without retiring (lost, preempted, unheard) no longer
        counts as live, and once its supervisor has had LEFT_JOB_GRACE_S to end it with the
        worker's status, it is cancelled if it still runs or waits: a node cut off or frozen holds
        no allocation once it is back, and a job that Slurm requeued does not wait in the queue or
        start again for nothing. At the end of the run (`final`) the grace is waited out."""
        for job in self._jobs:
            left_at = self.fence.left.get(job.job.name)
            if left_at is None or job.cancelled:
                continue
            job.ended = True
            wait = left_at + LEFT_JOB_GRACE_S - time.monotonic()
            if wait > 0 and not final:
                continue
            await asyncio.sleep(max(wait, 0))
            job.cancelled = True
            if (await self._job_status(job))[0]:
                continue
            self.log.warning(
                f"Sticky worker {job.job.name} left the run without retiring (lost, preempted, or unheard "
                f"for --sticky-node-timeout {self.settings.node_timeout:g} s) and its {self.system.name} job "
                f"{job.job.job_id} goes on: cancelling it."
            )
            await asyncio.to_thread(cancel, job.job)

    async def _job_status(self, job: BatchJob) -> tuple[bool, Optional[str]]:
        """Whether the batch system says the job has ended (not when it cannot say), and why it
        will never start, if it says that."""
        command = shlex.split(self.system.status_command.format(job_id=job.job.job_id))
        try:
            status = await asyncio.to_thread(
                subprocess.run, command, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S
            )
        except (OSError, subprocess.SubprocessError) as e:
            self.log.warning(f"Cannot ask {self.system.name} about job {job.job.job_id}: {e}")
            return False, None
        if status.returncode == 0 and (never := self.system.never_starts(status.stdout)) is not None:
            return False, never
        return self.system.gone(status.returncode, status.stdout), None

    def _running(self, identity: str) -> int:
        addresses = {j.address for j in self._jobs if j.template == identity and j.address and not j.ended}
        return sum(len(self._scheduler.workers[a].processing) for a in addresses if a in self._scheduler.workers)

    async def _add_jobs(self, template: TemplateSpec, count: int, outstanding: int, live: int) -> None:
        pools = self._pools[template.identity]
        for _ in range(count):
            in_pool = {p.name: 0 for p in pools}
            for job in self._jobs:
                if job.template == template.identity and not job.ended:
                    in_pool[job.pool] += 1
            open_pools = [p for p in pools if in_pool[p.name] < p.max_workers]
            if not open_pools:
                return
            pool = min(open_pools, key=lambda p: in_pool[p.name] / p.max_workers)
            name = worker_name(template.name, pool.name, next(self._names))
            job = job_for(
                self.system,
                template,
                pool,
                scheduler=self._scheduler.address,
                name=name,
                security=self.security,
                interface=self.settings.interface,
                log_directory=self.log_directory,
                run_id=self.run.run_id,
            )
            try:
                await asyncio.to_thread(submit, job)
            except Exception as e:  # the batch system refused the job (bad partition, say)
                self._start_failed(template, f"{self.system.name} refused the worker job: {e}")
                return
            self._jobs.append(BatchJob(job, template.identity, pool.name, time.time()))
            self.run.job_submitted(job.job_id)
            live += 1
            self.log.info(
                f"Sticky template '{template.name}': {outstanding} invocation(s) outstanding, "
                f"{live - 1} worker job(s) live: submitted {self.system.name} job {job.job_id} "
                f"(worker {name}, pool {pool.name})."
            )

    async def _retire_idle(self, template: TemplateSpec, live: list[BatchJob], now: float) -> None:
        for job in live:
            if job.address is None or job.idle_since is None:
                continue
            if now - job.idle_since < self.settings.idle_timeout:
                continue
            self.log.info(
                f"Sticky worker {job.job.name} (template '{template.name}', {self.system.name} job "
                f"{job.job.job_id}) idle for {now - job.idle_since:.0f} s with nothing waiting: retiring it."
            )
            job.ended = True
            await self._scheduler.retire_workers(workers=[job.address], close_workers=True, remove=True)
            await asyncio.to_thread(cancel, job.job)

    async def _poll_unconnected(self) -> None:
        """Ask the batch system about jobs whose worker never connected: one that is gone failed
        to start (after a few in a row the pool fails, pointing at the job logs); one that the
        batch system will never start fails the pool at once, saying why."""
        for job in [j for j in self._jobs if j.address is None and not j.ended]:
            gone, never = await self._job_status(job)
            if never is not None:
                job.ended = True
                await asyncio.to_thread(cancel, job.job)
                template = self._templates[job.template]
                self.fail_pool(
                    template,
                    f"Sticky template '{template.name}': {self.system.name} job {job.job.job_id} of its worker "
                    f"will never start: {never}. Ask for less in the template's cluster: entry or the "
                    "--sticky-* batch settings (cores follow the template's slots), or name another partition.",
                )
                continue
            if not gone:
                continue
            job.ended = True
            if job.job.name in {str(ws.name) for ws in self._scheduler.workers.values()}:
                continue
            self._start_failed(
                self._templates[job.template],
                f"{self.system.name} job {job.job.job_id} ended before its worker connected "
                f"(its output is in {self.log_directory})",
            )

    def _start_failed(self, template: TemplateSpec, cause: str) -> None:
        """Count a worker job that did not come up; after a few in a row the pool fails."""
        failures = self._failed_starts[template.identity] = self._failed_starts.get(template.identity, 0) + 1
        self.log.warning(f"Sticky template '{template.name}': {cause} ({failures}/{FAILED_STARTS}).")
        if failures >= FAILED_STARTS:
            self.fail_pool(
                template,
                f"Sticky template '{template.name}': {FAILED_STARTS} worker jobs in a row did not "
                f"come up; the last: {cause}",
            )

    async def _close_workers(self) -> None:
        """Retire every worker (each tears its state down; its job then ends by itself), then
        cancel the jobs that still wait in the queue or whose worker did not retire, so nothing
        stays queued or running after the workflow. A job whose worker has left already ends
        with it: its supervisor exits with the worker's status, which a cancel would overwrite."""
        self._closing = True
        self._scaler.cancel()
        self._track_workers(time.time())
        await self._end_left_jobs(final=True)
        connected = list(self._scheduler.workers)
        if connected:
            try:
                await asyncio.wait_for(
                    self._scheduler.retire_workers(workers=connected, close_workers=True, remove=True),
                    worker_close_s(self.settings),
                )
            except asyncio.TimeoutError:
                pass
        still = {str(ws.name) for ws in self._scheduler.workers.values()}
        jobs = [j.job for j in self._jobs if not j.ended and (j.address is None or j.job.name in still)]
        if jobs:
            self.log.info(f"Sticky: cancelling {len(jobs)} {self.system.name} worker job(s) still queued or running.")
        await asyncio.gather(*(asyncio.to_thread(cancel, job) for job in jobs), return_exceptions=True)

    def close(self) -> None:
        """Close the engine, then remove the run's folder and its credentials."""
        try:
            super().close()
        finally:
            self.run.remove()
