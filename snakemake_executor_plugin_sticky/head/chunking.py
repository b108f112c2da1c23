"""How many invocations travel to a worker in one Dask task.

Each Dask task costs the scheduler, the client and the worker about a millisecond of work, on
the machine the invocations run on: for invocations that take a millisecond themselves, that
doubles the run. Short invocations of a template therefore travel together, one after another in
one task, as many as run in about `TASK_S` by the template's recent invocations, and never so
many that a pass of Snakemake's scheduler leaves a slot of the template's workers without a task.
Until a template's first invocation is back, and for invocations longer than `TASK_S`, each
invocation is a task of its own: their results come back as each ends.
"""

from __future__ import annotations

import math
from typing import Sequence, TypeVar

T = TypeVar("T")

TASK_S = 0.05  # the longest a task of several invocations is expected to run
WEIGHT = 0.2  # of the latest invocation in a template's running mean


class Chunking:
    """The running mean of each template's invocation time, and the tasks it makes."""

    def __init__(self, task_s: float = TASK_S) -> None:
        self.task_s = task_s
        self._mean_s: dict[str, float] = {}  # template identity -> seconds an invocation takes

    def observe(self, identity: str, seconds: float) -> None:
        """An invocation of the template took `seconds` on its worker."""
        seconds = max(seconds, 0.0)
        mean = self._mean_s.get(identity)
        self._mean_s[identity] = seconds if mean is None else mean + WEIGHT * (seconds - mean)

    def size(self, identity: str, count: int, slots: int) -> int:
        """How many of `count` invocations of the template, ready now, go in one task, with
        `slots` invocation slots in its pool."""
        mean = self._mean_s.get(identity)
        if mean is None or mean >= self.task_s:
            return 1
        fits = int(self.task_s / max(mean, 1e-4))
        return max(1, min(fits, math.ceil(count / max(slots, 1))))

    def split(self, identity: str, items: Sequence[T], slots: int) -> list[list[T]]:
        """The template's ready invocations, in tasks of `size`, in their order."""
        size = self.size(identity, len(items), slots)
        return [list(items[i : i + size]) for i in range(0, len(items), size)]
