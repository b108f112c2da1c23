"""How many invocations travel to a worker in one Dask task.

Each Dask task costs the scheduler, the client and the worker about a millisecond of work, on
the machine the invocations run on: for invocations that take a millisecond themselves, that
doubles the run. Short invocations of a rule therefore travel together, one after another in
one task, as many as run in about `TASK_S` by the rule's recent invocations, and never so many
that a pass of Snakemake's scheduler leaves a slot of the template's workers without a task.
Until a rule's first invocation is back, and for invocations longer than `TASK_S`, each
invocation is a task of its own: their results come back as each ends. The means are kept per
rule of a template: one rule's fast invocations say nothing of another's. Should an invocation
of a shared task run long all the same, its worker hands the rest back (worker/shared_task.py).
"""

from __future__ import annotations

import math
from typing import Sequence, TypeVar

T = TypeVar("T")
Key = tuple[str, str]  # a template's identity and a rule's name

TASK_S = 0.05  # the longest a task of several invocations is expected to run
WEIGHT = 0.2  # of the latest invocation in a template's running mean


class Chunking:
    """The running mean of each rule's invocation time (per template), and the tasks it makes."""

    def __init__(self, task_s: float = TASK_S) -> None:
        self.task_s = task_s
        self._mean_s: dict[Key, float] = {}  # (template identity, rule) -> seconds an invocation takes

    def observe(self, key: Key, seconds: float) -> None:
        """An invocation of the rule took `seconds` on its worker."""
        seconds = max(seconds, 0.0)
        mean = self._mean_s.get(key)
        self._mean_s[key] = seconds if mean is None else mean + WEIGHT * (seconds - mean)

    def size(self, key: Key, count: int, slots: int) -> int:
        """How many of `count` invocations of the rule, ready now, go in one task, with `slots`
        invocation slots in its template's pool."""
        mean = self._mean_s.get(key)
        if mean is None or mean >= self.task_s:
            return 1
        fits = int(self.task_s / max(mean, 1e-4))
        return max(1, min(fits, math.ceil(count / max(slots, 1))))

    def split(self, key: Key, items: Sequence[T], slots: int) -> list[list[T]]:
        """The rule's ready invocations, in tasks of `size`, in their order."""
        size = self.size(key, len(items), slots)
        return [list(items[i : i + size]) for i in range(0, len(items), size)]
