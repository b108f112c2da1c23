"""Runs inside the Dask scheduler (a thread of the Snakemake process, or wherever an attached
scheduler runs): what the head needs the scheduler itself to do."""

from __future__ import annotations

import time
from typing import Any

from distributed.diagnostics.plugin import SchedulerPlugin

from ...wire import EVENT_TOPIC, RUNNING_TOPIC, Removed

# stimulus ids of Dask's orderly removals: Scheduler.retire_workers and Worker.close_gracefully
GRACEFUL_REMOVALS = ("retire-workers", "worker-close-gracefully")


class WorkerRemovalPlugin(SchedulerPlugin):
    """Runs in the scheduler: announces every worker that leaves, lost or retired, with the
    invocations that were running on it (the evidence against an invocation that crashes its
    workers). Workers say when an invocation starts and ends running with its state (topic
    RUNNING_TOPIC); invocations waiting for a state being built are not running."""

    name = "sticky-worker-removals"

    def __init__(self) -> None:
        self.running: dict[str, set[str]] = {}  # worker address -> Dask keys
        self.names: dict[str, str] = {}  # worker address -> name: gone from the scheduler at removal

    def add_worker(self, scheduler: Any, worker: str) -> None:
        """Remember the worker's name, which its removal no longer has."""
        self.names[worker] = str(scheduler.workers[worker].name)

    def log_event(self, topic: str, msg: Any) -> None:
        """Keep track of the invocations each worker is running."""
        if topic != RUNNING_TOPIC or not isinstance(msg, dict):
            return
        keys = self.running.setdefault(msg["worker"], set())
        (keys.add if msg["running"] else keys.discard)(msg["key"])

    def remove_worker(self, scheduler: Any, worker: str, *, stimulus_id: str, **kwargs: Any) -> None:
        # Retired on purpose (idle, walltime near, end of run): not a loss.
        """Announce the removal, graceful or not, with the invocations the worker was running."""
        graceful = stimulus_id.startswith(GRACEFUL_REMOVALS)
        running = sorted(self.running.pop(worker, ()))
        name = self.names.pop(worker, "")
        removed = Removed(address=worker, graceful=graceful, running=tuple(running), time=time.time(), name=name)
        scheduler.log_event(EVENT_TOPIC, removed.to_message())


def subscribed(dask_scheduler: Any, topic: str, client: str) -> bool:
    """On the scheduler: whether the client's subscription to the topic has arrived."""
    return client in dask_scheduler._broker._topics[topic].subscribers
