"""Attach mode: an existing Dask scheduler, with workers the user starts (opportunistic nodes,
a long-lived pool). The run registers each template's worker plugin with the scheduler, so every
worker that offers the template's tag builds the state, and unregisters it at the end, which
tears the state down; the workers and the scheduler stay as they were. Nothing here restarts or
closes them: a hung invocation fails, naming its worker.

The scheduler and the workers need this package, at the version Snakemake runs (the plugins are
its classes); the versions are checked on attach. A plain TCP scheduler beyond this machine is
refused: anyone who reaches it could run code in the workers.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
from pathlib import Path
from typing import Any

from distributed import Client
from snakemake_interface_common.exceptions import WorkflowError

from ...settings import ExecutorSettings
from ...templates import TemplateSpec
from ...wire import PACKAGE, VOUCH_HANDLER
from ..fence import Fence
from ..run_folders import RunFolder, clean_stale_runs
from .base import DaskBackend, OnEvent, worker_plugin
from .scheduler_plugin import WorkerRemovalPlugin

CLOSE_TIMEOUT_S = 10.0


# Must agree between Snakemake's process, the scheduler and the workers: the plugins are this
# package's classes, pickled with cloudpickle, run by Dask.
CHECKED_PACKAGES = (PACKAGE, "distributed", "dask", "cloudpickle")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


def scheduler_address(scheduler_file: str) -> str:
    """The scheduler's address from its scheduler file."""
    try:
        with open(scheduler_file) as f:
            return str(json.load(f)["address"])
    except (OSError, ValueError, KeyError) as e:
        raise WorkflowError(f"--sticky-scheduler {scheduler_file}: not a Dask scheduler file ({e}).") from e


# Schemes whose connections are authenticated and encrypted (TLS), and one that never leaves the process
SECURE_SCHEMES = ("tls", "wss", "inproc")


def refuse_plaintext(address: str, log: Any) -> None:
    """TLS beyond loopback: anyone who reaches a scheduler without TLS (tcp://, ws://, ucx://)
    can run code in its workers."""
    scheme, _, rest = address.rpartition("://")
    scheme = scheme or "tcp"
    if scheme in SECURE_SCHEMES:
        return
    host = rest.split("/", 1)[0]
    host = host.rsplit(":", 1)[0] if host.count(":") == 1 or host.startswith("[") else host
    if host.strip("[]") in LOOPBACK_HOSTS or host.startswith("127."):
        log.warning(
            f"--sticky-scheduler {address}: a {scheme}:// scheduler without TLS, which every user of this "
            "machine can reach and send work to. Prefer TLS (docs/further.md, Attach mode)."
        )
        return
    raise WorkflowError(
        f"--sticky-scheduler {address}: a {scheme}:// scheduler without TLS beyond this machine is refused, "
        "since anyone who reaches it could run code in your workers. Start the scheduler and workers with "
        "TLS (dask scheduler --protocol tls --tls-ca-file ca.pem --tls-cert cert.pem --tls-key key.pem), "
        f"give tls://{rest}, and put the credentials in Dask's config: distributed.comm.tls.ca-file, "
        "distributed.comm.tls.client.cert and distributed.comm.tls.client.key "
        "(or DASK_DISTRIBUTED__COMM__TLS__CA_FILE and so on)."
    )


def check_versions(client: Client, address: str) -> None:
    """The scheduler and every worker have this package and Dask at the versions here."""
    problems = version_problems(client.get_versions(check=False, packages=[PACKAGE]), address)
    if problems:
        mine = importlib.metadata.version(PACKAGE)
        raise WorkflowError(
            f"--sticky-scheduler {address}: versions differ, and the plugins this run sends must run there: "
            + "; ".join(problems)
            + f". Install the same versions where the scheduler and workers run (pip install {PACKAGE}=={mine})."
        )


def version_problems(versions: dict[str, Any], address: str) -> list[str]:
    """What differs between here and the scheduler or a worker, in Client.get_versions's answer."""
    mine = versions["client"]["packages"]
    others = [(f"the scheduler ({address})", versions["scheduler"])]
    others += [(f"worker {worker}", info) for worker, info in (versions.get("workers") or {}).items()]
    problems = []
    for package in CHECKED_PACKAGES:
        for where, info in others:
            theirs = (info or {}).get("packages", {}).get(package)
            if theirs != mine.get(package):
                problems.append(f"{package} {mine.get(package)} here, {theirs or 'not installed'} on {where}")
    python_here = ".".join(versions["client"]["host"]["python"].split(".")[:2])
    for where, info in others:
        python_there = ".".join(str((info or {}).get("host", {}).get("python", "?")).split(".")[:2])
        if python_there != python_here:
            problems.append(f"Python {python_here} here, {python_there} on {where}")
    return problems


def forget_vouches(dask_scheduler: Any) -> None:
    """On the user's scheduler: the handler the run's plugin added goes with the plugin."""
    dask_scheduler.handlers.pop(VOUCH_HANDLER, None)


def worker_command(address: str, template: TemplateSpec) -> str:
    """The command line that makes a machine one of the template's workers."""
    return (
        f"python -m snakemake_executor_plugin_sticky.worker.supervisor dask worker {address} "
        f"--resources {template.tag}={template.slots} --nthreads {template.slots} --memory-limit 0 --no-nanny"
    )


class AttachedBackend(DaskBackend):
    """A client of a scheduler that is not ours: plugins in, invocations through, nothing owned.
    Its workers may be on other hosts, and the scheduler may give one up while it still writes:
    invocations write in attempt folders of the run's own (fence.py), as batch jobs do."""

    def __init__(self, workdir: str, settings: ExecutorSettings, log: Any, on_event: OnEvent):
        super().__init__(on_event, crash_limit=settings.invocation_crashes)
        self.workdir = workdir
        self.settings = settings
        self.log = log
        self._plugins: dict[str, str] = {}
        target = settings.scheduler or ""
        by_file = os.path.isfile(target)
        refuse_plaintext(scheduler_address(target) if by_file else target, log)
        try:
            # Security (TLS files) comes from Dask's config, as for any Dask client.
            self._client = (
                Client(scheduler_file=target, set_as_default=False, timeout="30s")
                if by_file
                else Client(target, set_as_default=False, timeout="30s")
            )
        except Exception as e:
            raise WorkflowError(
                f"--sticky-scheduler {target}: cannot connect to the Dask scheduler "
                f"({type(e).__name__}: {e}). Give its address (tls://host:8786) or scheduler file, "
                "and its TLS credentials in Dask's config (distributed.comm.tls.*)."
            ) from e
        self.address = self._client.scheduler.address
        try:
            check_versions(self._client, self.address)
        except BaseException:
            self._client.close()
            raise
        runs = Path(workdir, ".snakemake", "sticky", "runs")
        clean_stale_runs(runs, log)
        self.run = RunFolder.create(runs, "attach", "true")  # it submits no job to cancel
        self.fence = Fence(self.run.path / "attempts")
        self.watch_workers()

    @property
    def client(self) -> Client:
        """The client of the user's scheduler."""
        return self._client

    def workers_for(self, template: TemplateSpec) -> int:
        """How many of the scheduler's workers offer the template's tag (at least 1)."""
        holders = [
            w
            for w in self._client.scheduler_info(n_workers=-1)["workers"].values()
            if template.tag in (w.get("resources") or {})
        ]
        return max(1, len(holders))

    def start_pool(self, template: TemplateSpec) -> int:
        """Register the template's worker plugin: the workers that offer its tag build the state."""
        if template.identity in self._plugins:
            return 0
        plugin = worker_plugin(template, self.workdir, self.settings, owned=False, endpoint_key=self.endpoint_key)
        self._client.register_plugin(plugin)
        self._plugins[template.identity] = plugin.name
        self.log.info(
            f"Sticky template '{template.name}' runs on the workers of {self.address} that offer "
            f"'{template.tag}'. Add one with: {worker_command(self.address, template)}"
        )
        return 0

    def close(self) -> None:
        """Unregister the plugins (each worker tears its state down); the workers stay."""
        self.close_events()
        try:
            try:
                self._client.unregister_scheduler_plugin(WorkerRemovalPlugin.name)
                self._client.run_on_scheduler(forget_vouches)
            except Exception as e:
                self.log.warning(f"Sticky: removing scheduler plugin {WorkerRemovalPlugin.name} failed: {e}")
            for name in self._plugins.values():
                try:
                    self._client.unregister_worker_plugin(name)
                except Exception as e:  # not registered anywhere any more: nothing to tear down
                    self.log.warning(f"Sticky: unregistering worker plugin {name} failed: {e}")
        finally:
            self._client.close(timeout=CLOSE_TIMEOUT_S)
            self.run.remove()
