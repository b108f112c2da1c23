"""Runs inside the Dask scheduler (a thread of the Snakemake process, or wherever an attached
scheduler runs): what the head needs the scheduler itself to do."""

from __future__ import annotations

import time
from typing import Any, Optional

from distributed.diagnostics.plugin import SchedulerPlugin

from ...wire import EVENT_TOPIC, RUNNING_TOPIC, VOUCH_HANDLER, Packed, Removed

# stimulus ids of Dask's orderly removals: Scheduler.retire_workers and Worker.close_gracefully
GRACEFUL_REMOVALS = ("retire-workers", "worker-close-gracefully")


class WorkerRemovalPlugin(SchedulerPlugin):
    """Runs in the scheduler: announces every worker that leaves, lost or retired, with the
    invocations that were running on it (the evidence against an invocation that crashes its
    workers). Workers say when an invocation starts and ends running with its state (topic
    RUNNING_TOPIC); invocations waiting for a state being built are not running.

    A task that was running an invocation on a worker that is lost does not run again as it was:
    before Dask sends it to another worker, it becomes a task that returns `wire.Lost`, and the
    head decides which of its invocations run again. Were Dask to run it again at once, an
    invocation that has crashed its workers as often as allowed would start once more before the
    head could stop it, and crash another worker. A task of several invocations becomes `Lost`
    too, running or not: an invocation that crashes its worker at its first line dies before its
    running event leaves the worker, and Dask would run the whole task again until it gave up on
    all of its invocations. The head sends them again one per task; a task of one invocation
    that is not known to run is Dask's to run again, and to give up (allowed-failures)."""

    name = "sticky-worker-removals"

    def __init__(self) -> None:
        self.running: dict[str, dict[str, str]] = {}  # worker address -> invocation key -> Dask key
        self.names: dict[str, str] = {}  # worker address -> name: gone from the scheduler at removal
        self.scheduler: Optional[Any] = None

    async def start(self, scheduler: Any) -> None:
        """Keep the scheduler, whose tasks a removal may change, and take the word of the
        workers' supervisors (VOUCH_HANDLER)."""
        self.scheduler = scheduler
        scheduler.handlers[VOUCH_HANDLER] = self.vouch

    def vouch(self, name: str) -> bool:
        """A worker's supervisor, a process of its own beside it, saw the worker's process alive
        and not stopped: the worker counts as heard now, though it may not answer itself (a
        step that holds its interpreter lock). A node cut off, frozen or crashed vouches for
        nothing, and its worker is given up as before. False for a worker not (yet) joined."""
        assert self.scheduler is not None, "the plugin was started"
        for ws in self.scheduler.workers.values():
            if ws.name == name:
                ws.last_seen = time.time()
                return True
        return False

    def add_worker(self, scheduler: Any, worker: str) -> None:
        """Remember the worker's name, which its removal no longer has."""
        self.names[worker] = str(scheduler.workers[worker].name)

    def log_event(self, topic: str, msg: Any) -> None:
        """Keep track of the invocations each worker is running; when a worker is lost, turn the
        tasks it was running invocations of into `wire.Lost` before they go anywhere else (Dask
        logs the removal just before it reschedules the worker's tasks)."""
        if topic == RUNNING_TOPIC and isinstance(msg, dict):
            keys = self.running.setdefault(msg["worker"], {})
            if msg["running"]:
                keys[msg["key"]] = msg["task"]
            else:
                keys.pop(msg["key"], None)
        elif topic == "all" and isinstance(msg, dict) and msg.get("action") == "remove-worker":
            if not str(msg.get("stimulus_id", "")).startswith(GRACEFUL_REMOVALS):
                self._lost(msg["worker"], set(msg.get("processing-tasks", ())))

    def _lost(self, worker: str, processing: set[str]) -> None:
        from dask._task_spec import Task

        from ...worker.task import lost

        assert self.scheduler is not None, "the plugin was started"
        running = set(self.running.get(worker, {}).values())
        for task in processing:
            state = self.scheduler.tasks.get(task)
            if state is not None and (task in running or invocations_in(state.run_spec) > 1):
                state.run_spec = Task(task, lost, worker)

    def remove_worker(self, scheduler: Any, worker: str, *, stimulus_id: str, **kwargs: Any) -> None:
        # Retired on purpose (idle, walltime near, end of run): not a loss.
        """Announce the removal, graceful or not, with the invocations the worker was running."""
        graceful = stimulus_id.startswith(GRACEFUL_REMOVALS)
        running = sorted(self.running.pop(worker, {}))
        name = self.names.pop(worker, "")
        removed = Removed(address=worker, graceful=graceful, running=tuple(running), time=time.time(), name=name)
        scheduler.log_event(EVENT_TOPIC, removed.to_message())


def invocations_in(run_spec: Any) -> int:
    """How many invocations a task carries (0 for a task that is not the run's)."""
    return sum(a.count for a in getattr(run_spec, "args", ()) if isinstance(a, Packed))


def subscribed(dask_scheduler: Any, topic: str, client: str) -> bool:
    """On the scheduler: whether the client's subscription to the topic has arrived."""
    return client in dask_scheduler._broker._topics[topic].subscribers
