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
