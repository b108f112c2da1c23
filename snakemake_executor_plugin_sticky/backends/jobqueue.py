"""Batch-job engine: the scheduler in the Snakemake process, listening on the network with TLS,
and each template's workers as batch jobs (one worker per job) submitted through dask-jobqueue.

Pools are elastic. A pool starts with no job; while invocations of its template wait, jobs are
added (one per `slots` outstanding invocations, up to the pool's `max-workers`); a worker idle for
`--sticky-idle-timeout` with nothing waiting is retired; a worker near its walltime retires
itself, letting its running invocations finish, and is replaced while work remains; a lost worker's invocations go to
another holder and the job is replaced. Every decision is logged. Jobs run the worker without a
Nanny: the batch system supervises the job, and the job ends when its worker does.

Each batch system is a thin `BatchSystem` filling dask-jobqueue's `Job` class for it.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import ipaddress
import re
import shlex
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from dask.utils import parse_bytes
from distributed.security import Security
from snakemake_interface_common.exceptions import WorkflowError

from ..runs import RunFolder, clean_stale_runs
from ..security import run_credentials, write_credentials
from ..settings import ExecutorSettings
from ..templates import TemplateSpec
from ..worker import LIFETIME_ENV
from .base import OnEvent, worker_plugin
from .local import HostedScheduler, worker_close_s


def import_dask_jobqueue() -> None:
    """dask_jobqueue installs a SIGINT handler when imported (its runner module); Snakemake's own
    must stay, so Ctrl-C still cancels the workflow. Signals are the main thread's business, so
    this module is imported there (by the executor, at start)."""
    previous = signal.getsignal(signal.SIGINT)
    import dask_jobqueue  # noqa: F401

    signal.signal(signal.SIGINT, previous)


import_dask_jobqueue()
from dask_jobqueue.htcondor import HTCondorJob  # noqa: E402
from dask_jobqueue.lsf import LSFJob  # noqa: E402
from dask_jobqueue.oar import OARJob  # noqa: E402
from dask_jobqueue.pbs import PBSJob  # noqa: E402
from dask_jobqueue.sge import SGEJob  # noqa: E402
from dask_jobqueue.slurm import SLURMJob  # noqa: E402

KEEPER = "snakemake_executor_plugin_sticky.keeper"
SCALE_PERIOD_S = 1.0
STATUS_POLL_S = 15.0
FAILED_STARTS = 3  # jobs in a row that end before their worker connects: the pool fails
NOMINAL_MEMORY = "1GB"
COMMAND_TIMEOUT_S = 60  # sbatch, squeue, scancel and their kind
DEATH_TIMEOUT_S = 60  # a worker that cannot reach the scheduler this long exits (and so its job)
POOL_KEYS = (
    "name", "queue", "account", "walltime", "memory", "cores", "job-extra",
    "gpu-directive", "prologue", "python", "max-workers",
)


@dataclass
class PoolSpec:
    """One pool of a template: batch-job settings, the --sticky-* ones overridden by the
    template's `cluster:` entry."""

    name: str
    max_workers: int
    walltime: str
    memory: Optional[str]
    cores: int
    queue: Optional[str] = None
    account: Optional[str] = None
    job_extra: list[str] = field(default_factory=list)
    gpu_directive: Optional[str] = None
    prologue: list[str] = field(default_factory=list)
    python: Optional[str] = None


def pools_of(template: TemplateSpec, settings: ExecutorSettings) -> list[PoolSpec]:
    """The template's pools; WorkflowError naming the template and the key when one is wrong."""
    entries = template.pools or ({},)
    pools = []
    for index, entry in enumerate(entries):
        where = f"Sticky template '{template.name}', cluster pool {index + 1}"
        unknown = sorted(set(entry) - set(POOL_KEYS))
        if unknown:
            raise WorkflowError(
                f"{where} has unknown key(s) {', '.join(map(repr, unknown))}; allowed are {', '.join(POOL_KEYS)}."
            )
        # a template's own `workers:` caps its batch jobs as it sizes its local pool
        max_workers = entry.get("max-workers", template.workers or settings.max_workers)
        cores = entry.get("cores", settings.job_cores or template.slots)
        for key, value in (("max-workers", max_workers), ("cores", cores)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise WorkflowError(f"{where}: '{key}' must be an integer >= 1, got {value!r}.")
        walltime = str(entry.get("walltime", settings.walltime))
        walltime_seconds(walltime, where)
        pools.append(
            PoolSpec(
                name=str(entry.get("name", index + 1)),
                max_workers=max_workers,
                walltime=walltime,
                memory=entry.get("memory", settings.memory),
                cores=cores,
                queue=entry.get("queue", settings.queue),
                account=entry.get("account", settings.account),
                job_extra=directives(entry.get("job-extra", settings.job_extra)),
                gpu_directive=entry.get("gpu-directive", settings.gpu_directive),
                prologue=lines(entry.get("prologue", settings.prologue)),
                python=entry.get("python", settings.python),
            )
        )
    return pools


def directives(value: Any) -> list[str]:
    """Job directives given as a list, or as one string with `;` between them."""
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple)) else str(value).split(";")
    return [str(v).strip() for v in items if str(v).strip()]


def lines(value: Any) -> list[str]:
    if value is None:
        return []
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]


def walltime_seconds(walltime: str, where: str = "--sticky-walltime") -> int:
    """[[D-]HH:]MM:SS as batch systems write it."""
    match = re.fullmatch(r"(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)", walltime.strip())
    if match is None:
        raise WorkflowError(f"{where}: walltime must look like HH:MM:SS, got {walltime!r}.")
    days, hours, minutes, seconds = (int(g or 0) for g in match.groups())
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def lifetime_seconds(walltime: str) -> int:
    """When a worker retires itself: at 90% of the walltime, but at most 10 min early."""
    total = walltime_seconds(walltime)
    return max(total - min(600, total // 10), 1)


class BatchSystem:
    """One batch system: dask-jobqueue's Job class, how a job asks for GPUs, how to tell whether
    a job still exists. Subclasses fill these in."""

    name: str
    gpu_directive: str
    status_command: str  # {job_id} is filled in; the job is gone when it fails or prints nothing
    finished_states: tuple[str, ...] = ()
    memory_directives: tuple[str, ...] = ()  # dropped when no memory is asked for
    account_keyword = "account"  # what the Job class calls the account ("project" on some)

    job_class: type  # dask-jobqueue's Job of the system

    def job_kwargs(self, pool: PoolSpec, gpus: int) -> dict[str, Any]:
        return {
            "queue": pool.queue, self.account_keyword: pool.account, "walltime": pool.walltime,
            "job_extra_directives": self.extra_directives(pool, gpus),
        }

    def extra_directives(self, pool: PoolSpec, gpus: int) -> list[str]:
        """The pool's extra directives, and the GPU request when the template has GPUs."""
        lines = list(pool.job_extra)
        if gpus:
            lines.append((pool.gpu_directive or self.gpu_directive).format(gpus=gpus))
        return lines

    def gone(self, returncode: int, output: str) -> bool:
        state = self.state_of(output)
        return returncode != 0 or not state or state in self.finished_states

    def state_of(self, output: str) -> str:
        """The job's state in the status command's output."""
        return output.strip().upper()


class Slurm(BatchSystem):
    name = "slurm"
    memory_directives = ("--mem",)
    gpu_directive = "--gres=gpu:{gpus}"
    status_command = "squeue -h -j {job_id} -o %T"
    finished_states = ("COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "PREEMPTED", "NODE_FAIL", "OUT_OF_MEMORY")
    job_class = SLURMJob


class PBS(BatchSystem):
    name = "pbs"
    gpu_directive = "-l ngpus={gpus}"
    status_command = "qstat {job_id}"
    job_class = PBSJob

    def job_kwargs(self, pool: PoolSpec, gpus: int) -> dict[str, Any]:
        kwargs = super().job_kwargs(pool, gpus)
        if pool.memory is None:
            kwargs["resource_spec"] = f"select=1:ncpus={pool.cores}"
        return kwargs


class SGE(BatchSystem):
    name = "sge"
    gpu_directive = "-l gpu={gpus}"
    status_command = "qstat -j {job_id}"
    account_keyword = "project"
    job_class = SGEJob


class LSF(BatchSystem):
    name = "lsf"
    gpu_directive = '-gpu "num={gpus}"'
    status_command = "bjobs -noheader -o stat {job_id}"
    finished_states = ("DONE", "EXIT")
    memory_directives = ("-M ",)
    account_keyword = "project"
    job_class = LSFJob

    def job_kwargs(self, pool: PoolSpec, gpus: int) -> dict[str, Any]:
        kwargs = super().job_kwargs(pool, gpus)
        hours, rest = divmod(walltime_seconds(pool.walltime) // 60, 60)
        kwargs["walltime"] = f"{hours:02d}:{rest:02d}"  # LSF's -W takes [HH:]MM
        kwargs["lsf_units"] = "MB"  # no probing of lsf.conf on the submit host
        return kwargs


class HTCondor(BatchSystem):
    name = "htcondor"
    gpu_directive = "request_gpus={gpus}"
    status_command = "condor_q {job_id} -af JobStatus"
    finished_states = ("3", "4")  # removed, completed
    memory_directives = ("RequestMemory",)
    job_class = HTCondorJob

    def job_kwargs(self, pool: PoolSpec, gpus: int) -> dict[str, Any]:
        lines = self.extra_directives(pool, gpus)
        if pool.account:
            lines.append(f"accounting_group = {pool.account}")
        # HTCondor has no walltime request; the worker still leaves at its lifetime.
        submit = {}
        for line in lines:
            key, equals, value = line.partition("=")
            if not equals:
                raise WorkflowError(f"HTCondor job directive {line!r} must look like key = value.")
            submit[key.strip()] = value.strip()
        return {"disk": "1GB", "job_extra_directives": submit}


class OAR(BatchSystem):
    name = "oar"
    gpu_directive = "-p gpu_count>={gpus}"
    status_command = "oarstat -s -j {job_id}"
    finished_states = ("TERMINATED", "ERROR")
    account_keyword = "project"
    job_class = OARJob

    def job_kwargs(self, pool: PoolSpec, gpus: int) -> dict[str, Any]:
        kwargs = super().job_kwargs(pool, gpus)
        kwargs["memory_per_core_property_name"] = "not_applicable"
        return kwargs

    def state_of(self, output: str) -> str:
        return output.strip().rsplit(":", 1)[-1].strip().upper()  # "<id>: Running"


SYSTEMS: dict[str, BatchSystem] = {s.name: s for s in (Slurm(), PBS(), SGE(), LSF(), HTCondor(), OAR())}


def job_for(
    system: BatchSystem, template: TemplateSpec, pool: PoolSpec, *, scheduler: str, name: str,
    security: Optional[Security], interface: Optional[str], log_directory: Optional[str], run_id: str,
) -> Any:
    """The dask-jobqueue Job of one worker of the template: one process offering the template's
    tag with `slots` threads, no memory limit, retiring itself before the walltime. The job's
    name carries the run's id, so the jobs of a run can be found (and cancelled) by name."""
    return system.job_class(
        scheduler=scheduler,
        name=name,
        job_name=f"sticky-{template.name}-{run_id}",
        cores=pool.cores,
        # dask-jobqueue needs a figure; without one the job asks for none (memory_directives)
        memory=pool.memory or NOMINAL_MEMORY,
        job_directives_skip=() if pool.memory else system.memory_directives,
        processes=1,
        nanny=False,
        python=pool.python,
        # the keeper (keeper.py) runs the worker: nothing the worker starts outlives it, and
        # the job ends with the worker's real exit status
        worker_command=f"{KEEPER} -m distributed.cli.dask_worker",
        security=security,
        interface=interface,
        death_timeout=DEATH_TIMEOUT_S,
        log_directory=log_directory,
        # the worker leaves in good order before the walltime (see StickyWorkerPlugin.leave)
        job_script_prologue=[*pool.prologue, f"export {LIFETIME_ENV}={lifetime_seconds(pool.walltime)}"],
        worker_extra_args=[
            "--no-nanny",
            "--resources", f"{template.tag}={template.slots}",
            "--nthreads", str(template.slots),
            "--memory-limit", "0",  # a resident model is meant to stay: the batch system caps memory
        ],
        **system.job_kwargs(pool, template.gpus),
    )


def submit(job: Any) -> None:
    """Submit the job's script (written by dask-jobqueue) and keep the job id. Blocking calls in a
    thread: asyncio's own subprocesses need the main thread's signal handling, which is Snakemake's."""
    with job.job_file() as script:
        done = subprocess.run(
            shlex.split(job.submit_command) + [script], capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S
        )
    if done.returncode != 0:
        raise RuntimeError(f"{job.submit_command} exited with {done.returncode}: {done.stderr.strip() or done.stdout.strip()}")
    job.job_id = job._job_id_from_submit_output(done.stdout)


def cancel(job: Any) -> None:
    """Cancel the job; one that has ended already is fine."""
    if job.job_id:
        subprocess.run(
            shlex.split(job.cancel_command) + [job.job_id], capture_output=True, timeout=COMMAND_TIMEOUT_S
        )


def network_host(interface: Optional[str]) -> str:
    """The address the workers reach this host at: the interface's, or else that of this host's
    name, which must not be a loopback address (a Debian hosts file maps the name to 127.0.1.1)."""
    if interface:
        from distributed.utils import get_ip_interface

        try:
            return get_ip_interface(interface)
        except ValueError as e:
            raise WorkflowError(f"--sticky-interface {interface}: {e} Interfaces here: {interfaces()}.") from e
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
    return address


def interfaces() -> str:
    import psutil  # a dependency of distributed

    found = []
    for name, addresses in psutil.net_if_addrs().items():
        ipv4 = [a.address for a in addresses if a.family == socket.AF_INET]
        found.append(f"{name} {ipv4[0]}" if ipv4 else name)
    return ", ".join(found) or "none found"


def check_pools(templates: list[TemplateSpec], settings: ExecutorSettings) -> None:
    """Build every pool's job once, before any job is submitted, so that a bad setting fails the
    run at once, naming it, rather than after the first jobs."""
    system = SYSTEMS[settings.cluster]
    for template in templates:
        for index, pool in enumerate(pools_of(template, settings), start=1):
            entry = template.pools[index - 1] if template.pools else {}

            def where(key: str, flag: str) -> str:
                return (
                    f"Sticky template '{template.name}', cluster pool {index}: '{key}'"
                    if key in entry
                    else f"--sticky-{flag} (template '{template.name}')"
                )

            if pool.memory is not None:
                try:
                    parse_bytes(str(pool.memory))
                except (ValueError, TypeError) as e:
                    raise WorkflowError(f"{where('memory', 'memory')} {pool.memory!r} is not a size such as 64GB ({e}).") from e
            if template.gpus:
                directive = pool.gpu_directive or system.gpu_directive
                try:
                    directive.format(gpus=template.gpus)
                except (KeyError, IndexError, ValueError) as e:
                    raise WorkflowError(
                        f"{where('gpu-directive', 'gpu-directive')} {directive!r} cannot be filled in: it may "
                        f"hold {{gpus}} and no other braces ({type(e).__name__}: {e})."
                    ) from e
            try:
                job_for(
                    system, template, pool, scheduler="tls://127.0.0.1:1", name="check", security=None,
                    interface=None, log_directory=None, run_id="check",
                )
            except WorkflowError as e:
                raise WorkflowError(f"{where('job-extra', 'job-extra')}: {e}") from e
            except Exception as e:
                raise WorkflowError(
                    f"Sticky template '{template.name}', cluster pool {index}: its {system.name} job cannot be "
                    f"written ({type(e).__name__}: {e}). Check its settings: {pool}."
                ) from e


@dataclass
class BatchJob:
    job: Any
    template: str
    pool: str
    submitted: float
    address: Optional[str] = None  # once its worker connected
    idle_since: Optional[float] = None
    ended: bool = False


class BatchBackend(HostedScheduler):
    """Workers as batch jobs of one batch system; the scheduler here, TLS on the network."""

    replaces_hung_workers = True

    def __init__(self, workdir: str, settings: ExecutorSettings, log: Any, on_event: OnEvent):
        self.workdir = workdir
        self.system = SYSTEMS[settings.cluster]
        self.run_dir = Path(workdir, ".snakemake", "sticky")
        self.host = network_host(settings.interface)
        clean_stale_runs(self.run_dir / "runs", log)
        self.run = RunFolder.create(self.run_dir / "runs", self.system.name, self.system.job_class.cancel_command)
        self.credentials = self.run.credentials
        self.log_directory = str(self.run_dir / "jobs")
        self._templates: dict[str, TemplateSpec] = {}
        self._pools: dict[str, list[PoolSpec]] = {}
        self._jobs: list[BatchJob] = []
        self._failed_starts: dict[str, int] = {}
        self._names = itertools.count(1)
        self._closing = False
        self._last_poll = 0.0
        super().__init__(settings, log, on_event, security=write_credentials(run_credentials(), self.credentials))
        self._scaler = asyncio.run_coroutine_threadsafe(self._scale_forever(), self._loop)
        log.info(
            f"Sticky workers run as {self.system.name} jobs named sticky-<template>-{self.run.run_id}; "
            f"scheduler at {self._scheduler.address} (TLS, credentials of this run in {self.credentials}); "
            f"job logs in {self.log_directory}."
        )

    def replace_worker(self, worker: str) -> None:
        """Close it: its job ends, and the pool submits another while work remains."""
        self._loop.call_soon_threadsafe(self._scheduler.close_worker, worker)

    def workers_for(self, template: TemplateSpec) -> int:
        pools = self._pools.get(template.identity) or pools_of(template, self.settings)
        return sum(p.max_workers for p in pools)

    def start_pool(self, template: TemplateSpec) -> int:
        """Register the template's worker plugin; jobs start when its invocations wait."""
        if template.identity in self._templates:
            return 0
        pools = pools_of(template, self.settings)
        self._client.register_plugin(worker_plugin(template, self.workdir, self.settings, owned=True))
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
            job.address = ws.address
            job.idle_since = None if ws.processing else (job.idle_since or now)

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
            name = f"{template.name}-{pool.name}-{next(self._names)}"
            job = job_for(
                self.system, template, pool, scheduler=self._scheduler.address, name=name,
                security=self.security, interface=self.settings.interface, log_directory=self.log_directory,
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
        to start. After a few in a row the pool fails, pointing at the job logs."""
        for job in [j for j in self._jobs if j.address is None and not j.ended]:
            command = shlex.split(self.system.status_command.format(job_id=job.job.job_id))
            try:
                status = await asyncio.to_thread(
                    subprocess.run, command, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S
                )
            except (OSError, subprocess.SubprocessError) as e:
                self.log.warning(f"Cannot ask {self.system.name} about job {job.job.job_id}: {e}")
                return
            if not self.system.gone(status.returncode, status.stdout):
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
        with it: its keeper exits with the worker's status, which a cancel would overwrite."""
        self._closing = True
        self._scaler.cancel()
        self._track_workers(time.time())
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
        try:
            super().close()
        finally:
            self.run.remove()
