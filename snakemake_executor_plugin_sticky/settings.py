"""Every `--sticky-*` flag: the executor's settings, shown by `snakemake --help` and the plugin catalog."""

from dataclasses import dataclass, field
from typing import Any, Optional

from snakemake_interface_executor_plugins.settings import ExecutorSettingsBase


def option(default: Any, help: str) -> Any:
    """A `--sticky-*` flag: its default and its help text (also shown in the plugin catalog)."""
    return field(default=default, metadata={"help": help, "env_var": False, "required": False})


@dataclass
class ExecutorSettings(ExecutorSettingsBase):
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
        "Worker losses (killed, crashed, preempted) tolerated per template before its "
        "invocations fail; an invocation caught in a lost worker runs again elsewhere, up to "
        "this many times. Losses are not job errors and do not use up --retries.",
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
    status_interval: float = option(
        30.0,
        "Seconds between the compact status lines (workers starting/ready, "
        "invocations running/waiting/done) in the log; 0 turns them off.",
    )
    dashboard_address: str = option(
        "127.0.0.1:8787",
        "Where the Dask dashboard listens when bokeh is installed (its address is "
        "logged). Loopback by default; another port is taken if this one is busy.",
    )
    setup_retry_delay: float = option(
        2.0,
        "Seconds a worker waits before retrying a failed template setup; the "
        "wait doubles after each further failure.",
    )
