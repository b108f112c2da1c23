"""Every `--sticky-*` flag: the executor's settings, shown by `snakemake --help` and the plugin catalog."""

from dataclasses import dataclass, field
from typing import Optional

from snakemake_interface_executor_plugins.settings import ExecutorSettingsBase


@dataclass
class ExecutorSettings(ExecutorSettingsBase):
    workers: Optional[int] = field(
        default=None,
        metadata={
            "help": "Resident worker processes per template. Default: one per visible GPU "
            "divided by the template's `gpus` when it asks for GPUs, else 1. A template's "
            "own `workers:` entry in the config takes precedence.",
            "env_var": False,
            "required": False,
        },
    )
    setup_attempts: int = field(
        default=3,
        metadata={
            "help": "How many times a worker tries to build a template's state before it "
            "fails that template's invocations with the cause.",
            "env_var": False,
            "required": False,
        },
    )
    max_worker_losses: int = field(
        default=50,
        metadata={
            "help": "Worker losses (killed, crashed, preempted) tolerated per template before its "
            "invocations fail; an invocation caught in a lost worker runs again elsewhere, up to "
            "this many times. Losses are not job errors and do not use up --retries.",
            "env_var": False,
            "required": False,
        },
    )
    invocation_timeout: Optional[float] = field(
        default=None,
        metadata={
            "help": "Seconds after which a running invocation fails as hung and its worker is "
            "replaced. A rule's `runtime` resource (minutes) takes precedence. Default: no limit.",
            "env_var": False,
            "required": False,
        },
    )
    preempt_grace: float = field(
        default=30.0,
        metadata={
            "help": "Seconds a worker that gets SIGTERM (as batch systems send before a kill) "
            "lets its running invocations finish; then it hands them back, tears down and exits.",
            "env_var": False,
            "required": False,
        },
    )
    status_interval: float = field(
        default=30.0,
        metadata={
            "help": "Seconds between the compact status lines (workers starting/ready, "
            "invocations running/waiting/done) in the log; 0 turns them off.",
            "env_var": False,
            "required": False,
        },
    )
    dashboard_address: str = field(
        default="127.0.0.1:8787",
        metadata={
            "help": "Where the Dask dashboard listens when bokeh is installed (its address is "
            "logged). Loopback by default; another port is taken if this one is busy.",
            "env_var": False,
            "required": False,
        },
    )
    setup_retry_delay: float = field(
        default=2.0,
        metadata={
            "help": "Seconds a worker waits before retrying a failed template setup; the "
            "wait doubles after each further failure.",
            "env_var": False,
            "required": False,
        },
    )
