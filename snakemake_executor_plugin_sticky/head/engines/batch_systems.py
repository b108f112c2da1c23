"""Batch-system dialects: how a worker job is written and submitted on Slurm, PBS, SGE, LSF,
HTCondor and OAR. One base class fills dask-jobqueue's Job class from a template's pool settings;
each batch system is a thin subclass with its own directives and status command. `check_pools`
writes every pool's job once before any is submitted, so a bad setting fails the run at once."""

from __future__ import annotations

import re
import shlex
import signal
import subprocess
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Optional

from dask.utils import parse_bytes
from distributed.security import Security
from snakemake_interface_common.exceptions import WorkflowError

from ...settings import ExecutorSettings
from ...templates import TemplateSpec
from ...wire import LIFETIME_ENV


def import_dask_jobqueue() -> None:
    """dask_jobqueue installs a SIGINT handler when imported (its runner module); Snakemake's own
    must stay, so Ctrl-C still cancels the workflow. Signals are the main thread's business, so
    this module is imported there (by the executor, at start). dask-jobqueue is an optional
    dependency: without it, the batch systems are refused with how to install it."""
    previous = signal.getsignal(signal.SIGINT)
    try:
        import dask_jobqueue  # noqa: F401
    except ImportError as e:
        raise WorkflowError(
            f"--sticky-cluster needs dask-jobqueue, which is not installed ({e}): "
            "pip install 'snakemake-executor-plugin-sticky[batch]'."
        ) from e
    finally:
        signal.signal(signal.SIGINT, previous)


import_dask_jobqueue()
from dask_jobqueue.htcondor import HTCondorJob  # noqa: E402
from dask_jobqueue.lsf import LSFJob  # noqa: E402
from dask_jobqueue.oar import OARJob  # noqa: E402
from dask_jobqueue.pbs import PBSJob  # noqa: E402
from dask_jobqueue.sge import SGEJob  # noqa: E402
from dask_jobqueue.slurm import SLURMJob  # noqa: E402

SUPERVISOR = "snakemake_executor_plugin_sticky.worker.supervisor"
NOMINAL_MEMORY = "1GB"
COMMAND_TIMEOUT_S = 60  # sbatch, squeue, scancel and their kind
DEATH_TIMEOUT_S = 60  # a worker that cannot reach the scheduler this long exits (and so its job)
POOL_KEYS = (
    "name",
    "queue",
    "account",
    "walltime",
    "memory",
    "cores",
    "job-extra",
    "gpu-directive",
    "prologue",
    "python",
    "max-workers",
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
                # a pool's own python:, else the template's environment (environments.py), else --sticky-python
                python=entry.get("python", shlex.join(template.launch) if template.launch else settings.python),
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
    """Shell lines given as a list, or as one string."""
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
    nodes_command: Optional[str] = None  # prints the compute nodes' addresses, one per line
    finished_states: tuple[str, ...] = ()
    memory_directives: tuple[str, ...] = ()  # dropped when no memory is asked for
    account_keyword = "account"  # what the Job class calls the account ("project" on some)

    job_class: type  # dask-jobqueue's Job of the system

    def job_kwargs(self, pool: PoolSpec, gpus: int) -> dict[str, Any]:
        """The keyword arguments of dask-jobqueue's Job class for one worker of the pool."""
        return {
            "queue": pool.queue,
            self.account_keyword: pool.account,
            "walltime": pool.walltime,
            "job_extra_directives": self.extra_directives(pool, gpus),
        }

    def extra_directives(self, pool: PoolSpec, gpus: int) -> list[str]:
        """The pool's extra directives, and the GPU request when the template has GPUs."""
        lines = list(pool.job_extra)
        if gpus:
            lines.append((pool.gpu_directive or self.gpu_directive).format(gpus=gpus))
        return lines

    def gone(self, returncode: int, output: str) -> bool:
        """Whether the status command says the job no longer exists or has ended."""
        state = self.state_of(output)
        return returncode != 0 or not state or state in self.finished_states

    def state_of(self, output: str) -> str:
        """The job's state in the status command's output."""
        return output.strip().upper()

    def never_starts(self, output: str) -> Optional[str]:
        """Why a pending job will never start (it asks for more than its partition has), where
        the status command says so; None otherwise."""
        return None


class Slurm(BatchSystem):
    """Slurm: sbatch, squeue, scancel."""

    name = "slurm"
    memory_directives = ("--mem",)
    gpu_directive = "--gres=gpu:{gpus}"
    status_command = "squeue -h -j {job_id} -o '%T %r'"
    nodes_command = "sinfo -h -N -o %o"
    finished_states = ("COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "PREEMPTED", "NODE_FAIL", "OUT_OF_MEMORY")
    # Pending reasons that no wait resolves: the job asks for more than the partition offers
    never = {
        "PartitionConfig": "its cores, memory or GPUs exceed what the partition's nodes have",
        "PartitionNodeLimit": "it asks for more nodes than the partition allows",
        "PartitionTimeLimit": "its walltime exceeds the partition's time limit",
        "BadConstraints": "its constraints match no node",
        "InvalidQOS": "its QOS is not valid",
        "InvalidAccount": "its account is not valid",
    }
    job_class = SLURMJob

    def state_of(self, output: str) -> str:
        return output.strip().split(" ", 1)[0].upper()

    def never_starts(self, output: str) -> Optional[str]:
        state, _, reason = output.strip().partition(" ")
        if state.upper() != "PENDING" or reason.strip() not in self.never:
            return None
        return f"Slurm holds it ({reason.strip()}): {self.never[reason.strip()]}"


class PBS(BatchSystem):
    """PBS Pro and Torque: qsub, qstat, qdel."""

    name = "pbs"
    gpu_directive = "-l ngpus={gpus}"
    status_command = "qstat {job_id}"
    job_class = PBSJob

    def job_kwargs(self, pool: PoolSpec, gpus: int) -> dict[str, Any]:
        """The keyword arguments of dask-jobqueue's Job class for one worker of the pool."""
        kwargs = super().job_kwargs(pool, gpus)
        if pool.memory is None:
            kwargs["resource_spec"] = f"select=1:ncpus={pool.cores}"
        return kwargs


class SGE(BatchSystem):
    """Sun/Univa/Son of Grid Engine: qsub, qstat, qdel."""

    name = "sge"
    gpu_directive = "-l gpu={gpus}"
    status_command = "qstat -j {job_id}"
    account_keyword = "project"
    job_class = SGEJob


class LSF(BatchSystem):
    """IBM Spectrum LSF: bsub, bjobs, bkill."""

    name = "lsf"
    gpu_directive = '-gpu "num={gpus}"'
    status_command = "bjobs -noheader -o stat {job_id}"
    finished_states = ("DONE", "EXIT")
    memory_directives = ("-M ",)
    account_keyword = "project"
    job_class = LSFJob

    def job_kwargs(self, pool: PoolSpec, gpus: int) -> dict[str, Any]:
        """The keyword arguments of dask-jobqueue's Job class for one worker of the pool."""
        kwargs = super().job_kwargs(pool, gpus)
        hours, rest = divmod(walltime_seconds(pool.walltime) // 60, 60)
        kwargs["walltime"] = f"{hours:02d}:{rest:02d}"  # LSF's -W takes [HH:]MM
        kwargs["lsf_units"] = "MB"  # no probing of lsf.conf on the submit host
        return kwargs


class HTCondor(BatchSystem):
    """HTCondor: condor_submit, condor_q, condor_rm; directives are key = value."""

    name = "htcondor"
    gpu_directive = "request_gpus={gpus}"
    status_command = "condor_q {job_id} -af JobStatus"
    finished_states = ("3", "4")  # removed, completed
    memory_directives = ("RequestMemory",)
    job_class = HTCondorJob

    def job_kwargs(self, pool: PoolSpec, gpus: int) -> dict[str, Any]:
        """The keyword arguments of dask-jobqueue's Job class for one worker of the pool."""
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
    """OAR: oarsub, oarstat, oardel."""

    name = "oar"
    gpu_directive = "-p gpu_count>={gpus}"
    status_command = "oarstat -s -j {job_id}"
    finished_states = ("TERMINATED", "ERROR")
    account_keyword = "project"
    job_class = OARJob

    def job_kwargs(self, pool: PoolSpec, gpus: int) -> dict[str, Any]:
        """The keyword arguments of dask-jobqueue's Job class for one worker of the pool."""
        kwargs = super().job_kwargs(pool, gpus)
        kwargs["memory_per_core_property_name"] = "not_applicable"
        return kwargs

    def state_of(self, output: str) -> str:
        """The job's state in the status command's output."""
        return output.strip().rsplit(":", 1)[-1].strip().upper()  # "<id>: Running"


SYSTEMS: dict[str, BatchSystem] = {s.name: s for s in (Slurm(), PBS(), SGE(), LSF(), HTCondor(), OAR())}


def job_for(
    system: BatchSystem,
    template: TemplateSpec,
    pool: PoolSpec,
    *,
    scheduler: str,
    name: str,
    security: Optional[Security],
    interface: Optional[str],
    log_directory: Optional[str],
    run_id: str,
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
        # the supervisor (supervisor.py) runs the worker: nothing the worker starts outlives it, and
        # the job ends with the worker's real exit status
        worker_command=f"{SUPERVISOR} -m distributed.cli.dask_worker",
        security=security,
        interface=interface,
        death_timeout=DEATH_TIMEOUT_S,
        log_directory=log_directory,
        # the worker leaves in good order before the walltime (see StickyWorkerPlugin.leave)
        job_script_prologue=[*pool.prologue, f"export {LIFETIME_ENV}={lifetime_seconds(pool.walltime)}"],
        worker_extra_args=[
            "--no-nanny",
            "--resources",
            f"{template.tag}={template.slots}",
            "--nthreads",
            str(template.slots),
            "--memory-limit",
            "0",  # a resident model is meant to stay: the batch system caps memory
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
        raise RuntimeError(
            f"{job.submit_command} exited with {done.returncode}: {done.stderr.strip() or done.stdout.strip()}"
        )
    job.job_id = job._job_id_from_submit_output(done.stdout)


def cancel(job: Any) -> None:
    """Cancel the job; one that has ended already is fine."""
    if job.job_id:
        subprocess.run(shlex.split(job.cancel_command) + [job.job_id], capture_output=True, timeout=COMMAND_TIMEOUT_S)


def setting_name(template: str, pool: int, entry: Any, key: str, flag: str) -> str:
    """Where a pool's setting comes from: the template's `cluster:` entry, or the flag."""
    if key in entry:
        return f"Sticky template '{template}', cluster pool {pool}: '{key}'"
    return f"--sticky-{flag} (template '{template}')"


def check_pools(templates: list[TemplateSpec], settings: ExecutorSettings) -> None:
    """Build every pool's job once, before any job is submitted, so that a bad setting fails the
    run at once, naming it, rather than after the first jobs."""
    system = SYSTEMS[settings.cluster]
    for template in templates:
        for index, pool in enumerate(pools_of(template, settings), start=1):
            entry = template.pools[index - 1] if template.pools else {}
            where = partial(setting_name, template.name, index, entry)
            if pool.memory is not None:
                try:
                    parse_bytes(str(pool.memory))
                except (ValueError, TypeError) as e:
                    raise WorkflowError(
                        f"{where('memory', 'memory')} {pool.memory!r} is not a size such as 64GB ({e})."
                    ) from e
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
                    system,
                    template,
                    pool,
                    scheduler="tls://127.0.0.1:1",
                    name="check",
                    security=None,
                    interface=None,
                    log_directory=None,
                    run_id="check",
                )
            except WorkflowError as e:
                raise WorkflowError(f"{where('job-extra', 'job-extra')}: {e}") from e
            except Exception as e:
                raise WorkflowError(
                    f"Sticky template '{template.name}', cluster pool {index}: its {system.name} job cannot be "
                    f"written ({type(e).__name__}: {e}). Check its settings: {pool}."
                ) from e


def node_addresses(system: BatchSystem) -> list[str]:
    """The compute nodes' addresses as the batch system lists them, in its order; none where it
    cannot say (then the scheduler's address comes from this host's name)."""
    if system.nodes_command is None:
        return []
    try:
        listed = subprocess.run(shlex.split(system.nodes_command), capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return list(dict.fromkeys(line.strip() for line in listed.stdout.splitlines() if line.strip()))
