"""A Dask task of several short invocations (head/chunking.py), and the watchdog that hands its
rest back to the head when one of them runs long.

The invocations of a shared task run one after another in its thread, and its results travel
together when the task ends. One that runs long (a hang, a slow input, a rule whose invocations
are slower than the template's others) would hold up the invocations behind it, and the results
of those before it, for as long as it runs. Once one has run `HAND_BACK_S`, the worker hands back
the results so far and the invocations not started yet (a `wire.HandedBack` event): the head
reports the results and sends the others again, one per task, to any free slot. The task then
carries on with the long one alone, and returns its result only.
"""

from __future__ import annotations

import pickle
import threading
import time
from collections import deque
from typing import Any, Callable, Optional

from ..wire import EVENT_TOPIC, HandedBack, Invocation, InvocationResult

HAND_BACK_S = 1.0  # a shared task's invocation running this long hands the rest of its task back
WATCH_S = 0.2  # how often the watchdog looks


class SharedTask:
    """The invocations of one task, taken one at a time by the task's thread; what has not been
    handed back is the task's to return."""

    def __init__(self, task: str, invocations: list[Invocation]) -> None:
        self.task = task
        self._waiting = deque(invocations)
        self._results: list[InvocationResult] = []
        self._running_since: Optional[float] = None
        self._lock = threading.Lock()

    def next(self) -> Optional[Invocation]:
        """The next invocation to run, or None when none is left to this task."""
        with self._lock:
            if not self._waiting:
                return None
            self._running_since = time.monotonic()
            return self._waiting.popleft()

    def done(self, result: InvocationResult) -> None:
        """The invocation taken last has ended."""
        with self._lock:
            self._running_since = None
            self._results.append(result)

    def results(self) -> list[InvocationResult]:
        """What the task returns: the results not handed back."""
        with self._lock:
            return list(self._results)

    def hand_back(self, now: float, after_s: float = HAND_BACK_S) -> Optional[tuple[list[InvocationResult], list[str]]]:
        """If the running invocation has run `after_s` and anything else is left: the results so
        far and the keys of the invocations not started, which the task no longer holds."""
        with self._lock:
            running_long = self._running_since is not None and now - self._running_since >= after_s
            if not running_long or not (self._waiting or self._results):
                return None
            results, waiting = self._results, [invocation.key for invocation in self._waiting]
            self._results, self._waiting = [], deque()
            return results, waiting


class Watchdog:
    """One thread per worker process that looks at its shared tasks every `WATCH_S` and hands
    back the rest of each whose invocation runs long; `send` takes the event's message."""

    def __init__(self, send: Callable[[dict[str, Any]], None], address: str) -> None:
        self._send = send
        self._address = address
        self._tasks: set[SharedTask] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._watch, name="sticky-hand-back", daemon=True).start()

    def add(self, task: SharedTask) -> None:
        with self._lock:
            self._tasks.add(task)

    def remove(self, task: SharedTask) -> None:
        with self._lock:
            self._tasks.discard(task)

    def _watch(self) -> None:
        while True:
            time.sleep(WATCH_S)
            with self._lock:
                tasks = list(self._tasks)
            for task in tasks:
                rest = task.hand_back(time.monotonic())
                if rest is not None:
                    results, waiting = rest
                    event = HandedBack(self._address, task.task, tuple(waiting), pickle.dumps(results))
                    self._send(event.to_message())


_watchdog: Optional[Watchdog] = None
_watchdog_lock = threading.Lock()


def watchdog(worker: Any) -> Watchdog:
    """This worker's watchdog, started with its first shared task."""
    global _watchdog
    with _watchdog_lock:
        if _watchdog is None:
            _watchdog = Watchdog(lambda message: worker.log_event(EVENT_TOPIC, message), worker.address)
        return _watchdog
