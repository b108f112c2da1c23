"""Every `--sticky-*` flag: the executor's settings, shown by `snakemake --help` and the plugin catalog."""

from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Optional

from snakemake_interface_executor_plugins.settings import ExecutorSettingsBase

# where workers run: embedded, or the batch systems of backends/jobqueue.py
CLUSTERS = ("local", "slurm", "pbs", "sge", "lsf", "htcondor", "oar")


def option(default: Any, text: str, **metadata: Any) -> Any:
    """A `--sticky-*` flag: its default and its help text (also shown in the plugin catalog)."""
    return field(default=default, metadata={"help": text, "env_var": False, "required": False, **metadata})


@dataclass
class ExecutorSettings(ExecutorSettingsBase):
    """The --sticky-* flags (also a profile's `sticky-*` keys), each with its help text."""

    workers: Optional[int] = option(
        None,
        "Resident worker processes per template. Default: one per visible GPU "
        "divided by the template's `gpus` when it asks for GPUs, else 1. A template's "
        "own `workers:` entry in the config takes precedence.",
    )
    setup_attempts: int = option(
        3,
        "How many times a worker tries to build a template's state before it "
        "fails that template's invocations with the cause.",
    )
    max_worker_losses: int = option(
        50,
        "Worker losses that no invocation is blamed for (a worker killed or crashed while no "
        "invocation ran on it, in its setup say) tolerated per template before its invocations "
        "fail. Losses are not job errors and do not use up --retries.",
    )
    invocation_crashes: int = option(
        3,
        "How many times one invocation may be running on a worker that dies (a segfault, a CUDA "
        "abort, the OOM killer) before it fails alone, saying so; the other invocations go on. "
        "With slots above 1, an invocation running beside the crashing one at each of those deaths "
        "is blamed with it.",
    )
    invocation_timeout: Optional[float] = option(
        None,
        "Seconds after which a running invocation fails as hung and its worker is "
        "replaced. A rule's `runtime` resource (minutes) takes precedence. Default: no limit.",
    )
    preempt_grace: float = option(
        30.0,
        "Seconds a worker that gets SIGTERM (as batch systems send before a kill) "
        "lets its running invocations finish; then it hands them back, tears down and exits.",
    )
    teardown_grace: float = option(
        10.0,
        "Seconds a retiring worker gives its template's teardown() and the processes the template "
        "started to end (they get SIGTERM after teardown); then they are killed with SIGKILL and "
        "the worker exits, even if threads of the template never end. Snakemake's exit waits at "
        "most about this long for its workers.",
    )
    status_interval: float = option(
        30.0,
        "Seconds between the compact status lines (workers starting/ready, "
        "invocations running/waiting/done) in the log; 0 turns them off.",
    )
    dashboard_address: Optional[str] = option(
        None,
        "Serve the Dask dashboard of the sticky workers at HOST:PORT, e.g. "
        "127.0.0.1:8787 (needs bokeh; another port is taken if this one is busy; the "
        "address is logged). Off by default: loading it takes about half a second of "
        "CPU from the run.",
    )
    setup_retry_delay: float = option(
        2.0,
        "Seconds a worker waits before retrying a failed template setup; the wait doubles after each further failure.",
    )
    cache_dir: Optional[str] = option(
        None,
        "Node-local folder for the copies stage() makes (kept between runs), in a subfolder only "
        "you can read; $VARIABLES and ~ are expanded on each node, e.g. '$TMPDIR' or "
        "'/local/scratch/$USER'. Default: $TMPDIR, else the system's temporary folder.",
    )
    cache_size: Optional[str] = option(
        None,
        "Largest size of a node's cache of stage() copies, e.g. 200GB; beyond it the least "
        "recently used copies that no worker uses are removed. Default: no limit.",
    )
    stage_readers: int = option(
        1,
        "How many nodes of the pool read the same source from the shared file system at once "
        "(stage()); the others wait, then copy from a node that has it.",
    )
    cluster: str = option(
        "local",
        "Where the resident workers run: 'local' (child processes of Snakemake on this machine) "
        "or as batch jobs through dask-jobqueue: 'slurm', 'pbs', 'sge', 'lsf', 'htcondor', 'oar'. "
        "Batch-job settings below apply to every template; a template's `cluster:` entry in the "
        "config overrides them (one mapping, or a list of mappings for several pools).",
        choices=list(CLUSTERS),
    )
    scheduler: Optional[str] = option(
        None,
        "Attach to an existing Dask scheduler instead of starting one: its address "
        "(tls://host:8786) or the path of its scheduler file. Workers are the ones you start, "
        "with `dask worker ADDRESS --resources sticky-<template>=<slots> --nthreads <slots>`; "
        "TLS credentials come from Dask's config (distributed.comm.tls.*).",
    )
    max_workers: int = option(
        4,
        "Batch jobs (one worker each) per template at most. Pools start with none and add a "
        "worker while invocations wait, one per `slots` waiting invocations.",
    )
    idle_timeout: float = option(
        120.0,
        "Seconds a batch-job worker may sit idle, with nothing waiting for its template, "
        "before it is retired and its job ends.",
    )
    node_timeout: float = option(
        60.0,
        "Seconds a batch-job worker may go unheard (its node cut off the network, frozen or "
        "crashed) before the run gives it up: its invocations run again on other workers, its job "
        "is cancelled, and nothing it still writes reaches an output. A worker busy in a step that "
        "holds Python's interpreter lock is not unheard: its supervisor vouches for it while its "
        "process lives.",
    )
    queue: Optional[str] = option(None, "Batch queue or partition of the worker jobs (Slurm: --partition).")
    account: Optional[str] = option(None, "Account or project the worker jobs are charged to.")
    walltime: str = option(
        "01:00:00",
        "Walltime of a worker job (HH:MM:SS). A worker retires gracefully shortly before it "
        "(at nine tenths of it, at most 10 min early) and is replaced while work remains.",
    )
    memory: Optional[str] = option(
        None, "Memory of a worker job (e.g. 64GB). Default: none asked for, the batch system's default applies."
    )
    job_cores: Optional[int] = option(None, "CPU cores of a worker job. Default: the template's `slots`.")
    job_extra: Optional[str] = option(
        None,
        "Extra directives for the worker jobs, separated by ';' (a list in a profile), e.g. "
        '"--qos=high; --constraint=a100" on Slurm or "+WantGPU = True" (key = value) on HTCondor.',
    )
    gpu_directive: Optional[str] = option(
        None,
        "How a worker job asks for its template's GPUs, with {gpus} for their number. "
        "Defaults: slurm --gres=gpu:{gpus}, pbs -l ngpus={gpus}, sge -l gpu={gpus}, "
        'lsf -gpu "num={gpus}", htcondor request_gpus={gpus}, oar -p gpu_count>={gpus}.',
    )
    prologue: Optional[str] = option(
        None,
        "Shell commands run in the job before the worker starts (module loads, environment "
        'activation), e.g. "module load cuda; source ~/venv/bin/activate".',
    )
    python: Optional[str] = option(
        None,
        "The Python that runs the worker in the job; it needs this plugin installed. "
        "Default: the Python running Snakemake (a shared file system is assumed).",
    )
    interface: Optional[str] = option(
        None,
        "Network interface the scheduler listens on and workers connect through (e.g. ib0). "
        "Default: on Slurm, the one this host reaches the compute nodes through; else the address "
        "of this host's name. The log says which address is used.",
    )
    other_executor: Optional[str] = option(
        None,
        "Executor plugin for jobs that are not sticky (e.g. 'slurm' or 'cluster-generic'), "
        "with its own --NAME-* flags on the same command line; localrules still run on this "
        "machine. Default: they all run on this machine, as under the local executor.",
    )
    other_executor_args: Optional[str] = option(
        None,
        "The other executor's own settings as its command-line flags, e.g. "
        '"--slurm-status-command squeue", for runs driven from Python, where there is no '
        "Snakemake command line to read them from.",
    )


def settings_table() -> str:
    """The Markdown table of every flag, its default and its help text: docs/further.md holds it
    (a test checks they agree), so the help texts here stay the one source."""
    rows = ["| flag | default | meaning |", "| --- | --- | --- |"]
    for setting in fields(ExecutorSettings):
        default = "" if setting.default is MISSING or setting.default is None else f"`{setting.default}`"
        flag = "--sticky-" + setting.name.replace("_", "-")
        rows.append(f"| `{flag}` | {default} | {setting.metadata['help']} |")
    return "\n".join(rows)


if __name__ == "__main__":  # python -m snakemake_executor_plugin_sticky.settings > the table for the docs
    print(settings_table())
